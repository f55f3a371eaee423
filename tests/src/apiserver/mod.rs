//! A test Kubernetes API server. No kube-apiserver can be installed here, so
//! tests of the kube source run the unmodified kube client against this: it
//! speaks the real list/watch protocol over HTTP for Services,
//! EndpointSlices, Nodes, Pods, Events, Leases, ConfigMaps and Secrets, and
//! injects faults on demand.
//!
//! The state outlives the HTTP listener, so a test can stop the server
//! (connections refused), start it again on the same port, and restart it
//! with its watch history gone (watches from old versions get 410 Gone).

mod http;
pub mod selector;
pub mod store;

use std::{
    net::{SocketAddr, TcpListener},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, bail};
use k8s_openapi::{Metadata, Resource, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{oneshot, watch};

use store::{Kind, Store};

/// State shared by every incarnation of the HTTP server.
pub struct Shared {
    pub store: Mutex<Store>,
    /// Every request as "METHOD uri", in arrival order.
    pub requests: Mutex<Vec<String>>,
    fail_requests: AtomicBool,
    hang_requests: AtomicBool,
    drop_watches: watch::Sender<u64>,
    bookmark_interval: Mutex<Duration>,
}

/// Opens the listening socket: tests bind it inside a network namespace.
pub type Binder = Arc<dyn Fn(u16) -> std::io::Result<TcpListener> + Send + Sync>;

struct Running {
    shutdown: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

pub struct ApiServer {
    shared: Arc<Shared>,
    binder: Binder,
    addr: SocketAddr,
    running: Option<Running>,
}

fn kind_of<K: Resource>() -> Kind {
    Kind::from_path(K::API_VERSION, K::URL_PATH_SEGMENT)
        .unwrap_or_else(|| panic!("the test API server does not serve {}", K::KIND))
}

impl ApiServer {
    /// Starts a server on a listener from `binder` (given port 0 the first time).
    pub fn start(binder: Binder) -> anyhow::Result<Self> {
        let listener = binder(0).context("binding the test API server")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(10_000)),
            requests: Mutex::new(Vec::new()),
            fail_requests: AtomicBool::new(false),
            hang_requests: AtomicBool::new(false),
            drop_watches: watch::channel(0).0,
            bookmark_interval: Mutex::new(Duration::from_secs(1)),
        });
        let mut server = Self { shared, binder, addr, running: None };
        server.serve(listener)?;
        Ok(server)
    }

    /// Binds on 127.0.0.1 of the current network namespace.
    pub fn start_on_loopback() -> anyhow::Result<Self> {
        Self::start(Arc::new(|port| TcpListener::bind(("127.0.0.1", port))))
    }

    fn serve(&mut self, listener: TcpListener) -> anyhow::Result<()> {
        listener.set_nonblocking(true)?;
        let (shutdown, stopped) = oneshot::channel::<()>();
        let shared = self.shared.clone();
        // Its own runtime: stopping it drops every connection at once, as a
        // killed API server would.
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let app = axum::Router::new().fallback(http::handle).with_state(shared);
                tokio::select! {
                    r = axum::serve(listener, app) => { r.ok(); }
                    _ = stopped => {}
                }
            });
            rt.shutdown_timeout(Duration::from_millis(100));
        });
        self.running = Some(Running { shutdown, thread });
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig pointing at this server.
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"{}\"}}\nusers:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test, namespace: default}}\ncurrent-context: test\n",
            self.url()
        );
        std::fs::write(path, config)?;
        Ok(())
    }

    /// Stops serving: open connections are cut and new ones refused.
    pub fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown.send(()).ok();
            r.thread.join().ok();
        }
    }

    /// Serves again on the same address, with the same state.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        if self.running.is_some() {
            bail!("the test API server is already running");
        }
        let listener = (self.binder)(self.addr.port()).context("re-binding the test API server")?;
        self.serve(listener)
    }

    /// A restart: stop, forget the watch history (clients watching from an
    /// older version get 410 Gone and must re-list), serve again.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.shared.store.lock().unwrap().compact();
        self.resume()
    }

    /// Ends every open watch stream (clients reconnect).
    pub fn drop_watches(&self) {
        self.shared.drop_watches.send_modify(|g| *g += 1);
    }

    /// While on, every request is answered with 500 Internal Server Error.
    pub fn fail_requests(&self, on: bool) {
        self.shared.fail_requests.store(on, Ordering::Relaxed);
    }

    /// While on, requests are taken and held unanswered (as an API server
    /// that hangs); they are answered once it is off.
    pub fn hang_requests(&self, on: bool) {
        self.shared.hang_requests.store(on, Ordering::Relaxed);
    }

    pub fn set_bookmark_interval(&self, every: Duration) {
        *self.shared.bookmark_interval.lock().unwrap() = every;
    }

    pub fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().unwrap().clone()
    }

    fn to_json<K: Serialize>(object: &K) -> serde_json::Value {
        serde_json::to_value(object).expect("k8s-openapi objects serialize")
    }

    fn from_json<K: DeserializeOwned>(v: serde_json::Value) -> anyhow::Result<K> {
        serde_json::from_value(v).context("decoding a stored object")
    }

    pub fn create<K: Resource + Serialize + DeserializeOwned>(&self, object: &K) -> anyhow::Result<K> {
        let v = self
            .shared
            .store
            .lock()
            .unwrap()
            .create(kind_of::<K>(), Self::to_json(object))
            .map_err(|e| anyhow::anyhow!(e.message))?;
        Self::from_json(v)
    }

    /// Creates or replaces `object`.
    pub fn apply<K: Resource + Metadata<Ty = ObjectMeta> + Serialize + DeserializeOwned>(
        &self,
        object: &K,
    ) -> anyhow::Result<K> {
        let mut v = Self::to_json(object);
        // Replace whatever version is stored: the test is the only writer.
        if let Some(m) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            m.remove("resourceVersion");
        }
        let v = self.shared.store.lock().unwrap().apply(kind_of::<K>(), v).map_err(|e| anyhow::anyhow!(e.message))?;
        Self::from_json(v)
    }

    /// Creates or replaces a raw JSON object of `kind` (for objects no
    /// typed client could produce, such as invalid field values).
    pub fn apply_json(&self, kind: Kind, object: serde_json::Value) -> anyhow::Result<()> {
        self.shared.store.lock().unwrap().apply(kind, object).map_err(|e| anyhow::anyhow!(e.message))?;
        Ok(())
    }

    /// Deletes as `DELETE` with `gracePeriodSeconds` does.
    pub fn delete_with_grace<K: Resource>(&self, namespace: &str, name: &str, grace: i64) -> anyhow::Result<()> {
        self.shared
            .store
            .lock()
            .unwrap()
            .delete(kind_of::<K>(), namespace, name, Some(grace))
            .map_err(|e| anyhow::anyhow!(e.message))?;
        Ok(())
    }

    pub fn delete<K: Resource>(&self, namespace: &str, name: &str) -> anyhow::Result<()> {
        self.shared
            .store
            .lock()
            .unwrap()
            .delete(kind_of::<K>(), namespace, name, None)
            .map_err(|e| anyhow::anyhow!(e.message))?;
        Ok(())
    }

    pub fn get<K: Resource + DeserializeOwned>(&self, namespace: &str, name: &str) -> anyhow::Result<K> {
        let v = self
            .shared
            .store
            .lock()
            .unwrap()
            .get(kind_of::<K>(), namespace, name)
            .map_err(|e| anyhow::anyhow!(e.message))?;
        Self::from_json(v)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}
