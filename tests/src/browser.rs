//! Debian's headless Chromium, driven over WebDriver by chromedriver, both
//! inside a network namespace: pages served there are tested as a user's
//! browser sees them, and no traffic leaves the namespace.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::netns::{Netns, run_in};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const DRIVER_PORT: u16 = 9515;

/// The flags that let Chromium run headless as root on a closed network.
const FLAGS: [&str; 9] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
];

/// One browser session; the browser and its driver end on drop.
pub struct Browser {
    driver: Child,
    ns: String,
    session: String,
    _profile: tempfile::TempDir,
}

/// Sends one WebDriver command inside `ns` and returns its `value`.
fn call(ns: &str, method: &'static str, path: String, body: Option<Value>) -> anyhow::Result<Value> {
    let url = format!("http://127.0.0.1:{DRIVER_PORT}{path}");
    let answer = run_in(ns, move || -> anyhow::Result<Value> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .http_status_as_error(false)
            .build()
            .into();
        let mut response = match (method, body) {
            ("POST", body) => agent.post(&url).send_json(body.unwrap_or_else(|| json!({})))?,
            ("DELETE", _) => agent.delete(&url).call()?,
            _ => agent.get(&url).call()?,
        };
        let status = response.status();
        let value: Value = response.body_mut().read_json()?;
        if !status.is_success() {
            bail!("WebDriver {method} {url}: {status}: {}", value["value"]["message"]);
        }
        Ok(value["value"].clone())
    })??;
    Ok(answer)
}

impl Browser {
    /// Starts chromedriver and a Chromium session in `ns`.
    pub fn start(ns: &Netns) -> anyhow::Result<Self> {
        for bin in [CHROMIUM, CHROMEDRIVER] {
            if !std::path::Path::new(bin).exists() {
                bail!("{bin} not found: `cargo xtask setup` installs Debian's chromium and chromium-driver");
            }
        }
        let driver = Command::new("ip")
            .args(["netns", "exec", ns.name(), CHROMEDRIVER, &format!("--port={DRIVER_PORT}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver")?;
        let profile = tempfile::Builder::new().prefix("kpr-chromium-").tempdir()?;
        let mut browser = Self { driver, ns: ns.name().to_string(), session: String::new(), _profile: profile };
        let deadline = Instant::now() + Duration::from_secs(20);
        while call(&browser.ns, "GET", "/status".into(), None).map(|v| v["ready"] != true).unwrap_or(true) {
            if Instant::now() > deadline {
                bail!("chromedriver did not become ready within 20 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut args: Vec<String> = FLAGS.iter().map(|f| f.to_string()).collect();
        args.push(format!("--user-data-dir={}", browser._profile.path().display()));
        let session = call(
            &browser.ns,
            "POST",
            "/session".into(),
            Some(json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
                "goog:loggingPrefs": {"browser": "ALL"},
            }}})),
        )
        .context("starting a Chromium session")?;
        browser.session = session["sessionId"].as_str().context("no session id")?.to_string();
        Ok(browser)
    }

    fn command(&self, method: &'static str, what: &str, body: Option<Value>) -> anyhow::Result<Value> {
        call(&self.ns, method, format!("/session/{}/{what}", self.session), body)
    }

    /// Loads `url` and waits for the load to finish.
    pub fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.command("POST", "url", Some(json!({ "url": url }))).map(drop)
    }

    /// Runs `script` (a function body; `return` gives the result) in the page.
    pub fn eval(&self, script: &str) -> anyhow::Result<Value> {
        self.command("POST", "execute/sync", Some(json!({"script": script, "args": []})))
    }

    /// Evaluates `script` until `done` accepts its result.
    pub fn wait_for(&self, script: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.eval(script)?;
            if done(&value) {
                return Ok(value);
            }
            if Instant::now() > deadline {
                bail!("after {timeout:?}, `{script}` still gives {value}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Console messages at error level since the last call.
    pub fn console_errors(&self) -> anyhow::Result<Vec<String>> {
        let entries = self.command("POST", "se/log", Some(json!({"type": "browser"})))?;
        Ok(entries
            .as_array()
            .context("log entries")?
            .iter()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .collect())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ending the session quits Chromium; then the driver itself goes.
        if !self.session.is_empty() {
            call(&self.ns, "DELETE", format!("/session/{}", self.session), None).ok();
        }
        // `ip netns exec` execs chromedriver, so this PID is the driver's.
        self.driver.kill().ok();
        self.driver.wait().ok();
    }
}
