//! The container runtime over CRI v1: RuntimeService and ImageService on a
//! unix socket, with tonic and the `k8s-cri` protos.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    self as cri, image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient,
};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{
    cgroups,
    error::{KubeletError, Result, call},
};

/// The runtime's socket from `unix:///path` (or a bare path).
pub fn socket_path(endpoint: &str) -> Result<PathBuf> {
    match endpoint.strip_prefix("unix://") {
        Some(path) => Ok(path.into()),
        None if endpoint.starts_with('/') => Ok(endpoint.into()),
        None => {
            Err(KubeletError::Runtime(format!("container runtime endpoint {endpoint:?} is not unix:///path/to/socket")))
        }
    }
}

/// Both CRI services on one connection.
#[derive(Clone)]
pub struct Cri {
    pub runtime: RuntimeServiceClient<Channel>,
    /// The RuntimeService without the request deadline, for calls that
    /// rightly take longer and bound themselves (StopContainer within a
    /// grace period, a hook's ExecSync).
    pub runtime_unbounded: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
}

/// What `Version` said.
#[derive(Debug)]
pub struct RuntimeInfo {
    pub name: String,
    pub version: String,
    pub api_version: String,
}

/// The kubelet's default `--runtime-request-timeout`.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

impl Cri {
    /// Connects to `endpoint` (`unix:///run/containerd/containerd.sock`).
    /// Every RuntimeService call fails after `request_timeout` rather than
    /// hang (the kubelet's `--runtime-request-timeout`); image pulls, which
    /// may rightly take longer, are not held to it.
    pub async fn connect(endpoint: &str, request_timeout: Duration) -> Result<Self> {
        let path = socket_path(endpoint)?;
        if !path.exists() {
            return Err(KubeletError::Runtime(format!(
                "no container runtime at {}: is containerd running? (--container-runtime-endpoint)",
                path.display()
            )));
        }
        let unreachable = |e: tonic::transport::Error| {
            KubeletError::Runtime(format!("connecting to the container runtime at {endpoint}: {e}"))
        };
        // The URI is required by tonic but unused: every connection goes to the socket.
        let base = Endpoint::from_static("http://[::]:50051").connect_timeout(Duration::from_secs(5));
        let connector = || {
            let path = path.clone();
            tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
            })
        };
        let runtime =
            base.clone().timeout(request_timeout).connect_with_connector(connector()).await.map_err(unreachable)?;
        let images = base.connect_with_connector(connector()).await.map_err(unreachable)?;
        Ok(Self {
            runtime: RuntimeServiceClient::new(runtime),
            runtime_unbounded: RuntimeServiceClient::new(images.clone()),
            images: ImageServiceClient::new(images),
        })
    }

    /// The cgroup driver the runtime says it uses (CRI `RuntimeConfig`, as
    /// the kubelet asks since 1.31), or `configured` when it does not say.
    pub async fn cgroup_driver(&mut self, configured: cgroups::Driver) -> cgroups::Driver {
        let said = match self.runtime.runtime_config(cri::RuntimeConfigRequest {}).await {
            Ok(r) => r.into_inner().linux.map(|l| l.cgroup_driver),
            Err(e) => {
                tracing::info!(driver = ?configured, reason = %e.message(), "the runtime does not say its cgroup driver: --cgroup-driver it is");
                return configured;
            }
        };
        let driver = match said.and_then(|d| cri::CgroupDriver::try_from(d).ok()) {
            Some(cri::CgroupDriver::Systemd) => cgroups::Driver::Systemd,
            Some(cri::CgroupDriver::Cgroupfs) => cgroups::Driver::Cgroupfs,
            None => configured,
        };
        if driver != configured {
            tracing::info!(driver = ?driver, flag = ?configured, "the runtime's cgroup driver overrides --cgroup-driver");
        }
        driver
    }

    /// A client that reaches no runtime, for tests of code that holds one.
    #[cfg(test)]
    pub fn disconnected() -> Self {
        let channel = Endpoint::from_static("http://[::]:1").connect_lazy();
        Self {
            runtime: RuntimeServiceClient::new(channel.clone()),
            runtime_unbounded: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        }
    }

    /// `Version`, then `Status`: fails with the runtime's own words unless
    /// both RuntimeReady and NetworkReady hold.
    pub async fn check(&mut self) -> Result<RuntimeInfo> {
        let v = self
            .runtime
            .version(cri::VersionRequest { version: "v1".into() })
            .await
            .map_err(|e| {
                KubeletError::Runtime(format!(
                    "the runtime does not answer CRI v1 Version (is its CRI plugin enabled?): {}",
                    e.message()
                ))
            })?
            .into_inner();
        let status =
            self.runtime.status(cri::StatusRequest { verbose: false }).await.map_err(call("Status"))?.into_inner();
        let conditions: HashMap<String, cri::RuntimeCondition> = status
            .status
            .map(|s| s.conditions.into_iter().map(|c| (c.r#type.clone(), c)).collect())
            .unwrap_or_default();
        for wanted in ["RuntimeReady", "NetworkReady"] {
            match conditions.get(wanted) {
                Some(c) if c.status => {}
                Some(c) => {
                    return Err(KubeletError::Runtime(format!(
                        "container runtime {} is not ready: {wanted} is false: {} {}",
                        v.runtime_name, c.reason, c.message
                    )));
                }
                None => {
                    return Err(KubeletError::Runtime(format!(
                        "container runtime {} does not report {wanted}",
                        v.runtime_name
                    )));
                }
            }
        }
        Ok(RuntimeInfo { name: v.runtime_name, version: v.runtime_version, api_version: v.runtime_api_version })
    }
}
