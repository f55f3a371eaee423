//! What a probe or a lifecycle hook does to a container: exec (CRI
//! ExecSync), httpGet, tcpSocket or gRPC health checks against the pod, or
//! sleep.

use std::time::Duration;

use k8s_cri::v1 as cri;
use k8s_openapi::{
    api::core::v1::{Container, ExecAction, GRPCAction, HTTPGetAction, LifecycleHandler, Probe, TCPSocketAction},
    apimachinery::pkg::util::intstr::IntOrString,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::cri::Cri;

/// The action of a probe or a hook, whichever it is.
#[derive(Default)]
pub struct Action<'a> {
    exec: Option<&'a ExecAction>,
    http_get: Option<&'a HTTPGetAction>,
    tcp_socket: Option<&'a TCPSocketAction>,
    grpc: Option<&'a GRPCAction>,
    sleep: Option<i64>,
    /// Why the action it names cannot run here.
    unsupported: Option<&'static str>,
}

impl<'a> Action<'a> {
    pub fn of_probe(p: &'a Probe) -> Self {
        Self {
            exec: p.exec.as_ref(),
            http_get: p.http_get.as_ref(),
            tcp_socket: p.tcp_socket.as_ref(),
            grpc: p.grpc.as_ref(),
            ..Default::default()
        }
    }

    /// A postStart or preStop hook. As the kubelet, a tcpSocket hook is
    /// refused (the API keeps the field only for compatibility).
    pub fn of_hook(h: &'a LifecycleHandler) -> Self {
        Self {
            exec: h.exec.as_ref(),
            http_get: h.http_get.as_ref(),
            sleep: h.sleep.as_ref().map(|s| s.seconds),
            unsupported: h.tcp_socket.is_some().then_some("tcpSocket is not supported in lifecycle hooks"),
            ..Default::default()
        }
    }
}

/// The port a probe names, by number or by the container's port name.
fn port(c: &Container, p: &IntOrString) -> Result<u16, String> {
    match p {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|e| format!("port {n}: {e}")),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name.as_str()))
            .and_then(|cp| u16::try_from(cp.container_port).ok())
            .ok_or_else(|| format!("no container port named {name:?}")),
    }
}

/// Runs `action` for instance `id` of `c` within `timeout`.
pub async fn run(
    mut cri: Cri,
    c: &Container,
    id: &str,
    action: &Action<'_>,
    timeout: Duration,
    pod_ip: Option<&str>,
) -> Result<(), String> {
    if let Some(seconds) = action.sleep {
        tokio::time::sleep(Duration::from_secs(seconds.max(0) as u64).min(timeout)).await;
        return Ok(());
    }
    if let Some(exec) = action.exec {
        let req = cri::ExecSyncRequest {
            container_id: id.to_string(),
            cmd: exec.command.clone().unwrap_or_default(),
            timeout: timeout.as_secs() as i64,
        };
        // Bounded here, by the probe's or hook's own time, not the request deadline.
        let r = tokio::time::timeout(timeout + Duration::from_secs(1), cri.runtime_unbounded.exec_sync(req))
            .await
            .map_err(|_elapsed| format!("command timed out after {timeout:?}"))?
            .map_err(|e| format!("exec: {}", e.message()))?
            .into_inner();
        if r.exit_code == 0 {
            return Ok(());
        }
        let out = String::from_utf8_lossy(&[r.stdout, r.stderr].concat()).trim().to_string();
        return Err(format!("command exited with {}: {out}", r.exit_code));
    }
    let host = |h: Option<&String>| h.cloned().or_else(|| pod_ip.map(str::to_string)).ok_or("the pod has no IP yet");
    if let Some(tcp) = action.tcp_socket {
        let addr = (host(tcp.host.as_ref())?, port(c, &tcp.port)?);
        let what = format!("dial tcp {}:{}", addr.0, addr.1);
        return match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((addr.0.as_str(), addr.1))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("{what}: {e}")),
            Err(_) => Err(format!("{what}: timed out after {timeout:?}")),
        };
    }
    if let Some(http) = action.http_get {
        let tls = http.scheme.as_deref().is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"));
        let (h, port) = (host(http.host.as_ref())?, port(c, &http.port)?);
        let path = http.path.clone().filter(|p| !p.is_empty()).unwrap_or_else(|| "/".into());
        // The probe's own headers replace the defaults of the same name.
        let mut headers = vec![
            ("Host".to_string(), format!("{h}:{port}")),
            ("User-Agent".to_string(), "kube-probe/1.34".to_string()),
            ("Accept".to_string(), "*/*".to_string()),
        ];
        for hd in http.http_headers.iter().flatten() {
            headers.retain(|(name, _)| !name.eq_ignore_ascii_case(&hd.name));
        }
        headers.extend(http.http_headers.iter().flatten().map(|hd| (hd.name.clone(), hd.value.clone())));
        let headers: String = headers.iter().map(|(n, v)| format!("{n}: {v}\r\n")).collect();
        let request = format!("GET {path} HTTP/1.1\r\n{headers}Connection: close\r\n\r\n");
        let url = format!("{}://{h}:{port}{path}", if tls { "https" } else { "http" });
        let get = async {
            let stream = tokio::net::TcpStream::connect((h.as_str(), port)).await?;
            if tls {
                // As the kubelet: HTTPS without checking the certificate.
                let name = rustls::pki_types::ServerName::try_from(h.clone())
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                let stream = tokio_rustls::TlsConnector::from(insecure_tls()).connect(name, stream).await?;
                status_line(stream, &request).await
            } else {
                status_line(stream, &request).await
            }
        };
        let head = match tokio::time::timeout(timeout, get).await {
            Ok(Ok(head)) => head,
            Ok(Err(e)) => return Err(format!("Get {url:?}: {e}")),
            Err(_) => return Err(format!("Get {url:?}: timed out after {timeout:?}")),
        };
        let line = String::from_utf8_lossy(&head);
        let code: Option<u16> = line.split_whitespace().nth(1).and_then(|c| c.parse().ok());
        return match code {
            Some(code) if (200..400).contains(&code) => Ok(()),
            Some(code) => Err(format!("HTTP probe failed with statuscode: {code}")),
            None => Err(format!("Get {url:?}: not an HTTP answer")),
        };
    }
    if let Some(grpc) = action.grpc {
        return grpc_check(pod_ip.ok_or("the pod has no IP yet")?, grpc, timeout).await;
    }
    Err(action.unsupported.unwrap_or("it names no action").into())
}

/// Sends `request` and reads up to the end of the answer's status line.
async fn status_line(
    mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    request: &str,
) -> std::io::Result<Vec<u8>> {
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < 4096 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

/// A TLS client that accepts any certificate, as the kubelet's HTTPS probes
/// and hooks (`InsecureSkipVerify`): a pod's certificate names what its
/// clients reach, not its IP.
fn insecure_tls() -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::{
        DigitallySignedStruct, SignatureScheme,
        client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
        pki_types::{CertificateDer, ServerName, UnixTime},
    };
    #[derive(Debug)]
    struct AnyCertificate(std::sync::Arc<CryptoProvider>);
    impl ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        // Signatures are still checked: the peer holds the certificate's key.
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    static CONFIG: std::sync::OnceLock<std::sync::Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default TLS versions")
                .dangerous()
                .with_custom_certificate_verifier(std::sync::Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            std::sync::Arc::new(config)
        })
        .clone()
}

/// The standard gRPC health check (`grpc.health.v1.Health/Check`) on the
/// pod's IP, as the kubelet's gRPC probe: SERVING succeeds.
async fn grpc_check(ip: &str, grpc: &GRPCAction, timeout: Duration) -> Result<(), String> {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let service = grpc.service.clone().unwrap_or_default();
    let port = u16::try_from(grpc.port).map_err(|e| format!("port {}: {e}", grpc.port))?;
    let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_string() };
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{host}:{port}"))
        .map_err(|e| format!("gRPC endpoint {host}:{port}: {e}"))?;
    let check = async {
        let channel = endpoint.connect().await.map_err(|e| format!("failed to connect service {host}:{port}: {e}"))?;
        let request = HealthCheckRequest { service: service.clone() };
        let answer = HealthClient::new(channel)
            .check(request)
            .await
            .map_err(|e| format!("health rpc probe failed: {:?}: {}", e.code(), e.message()))?;
        Ok::<_, String>(answer.into_inner().status)
    };
    let status = tokio::time::timeout(timeout, check)
        .await
        .map_err(|_elapsed| format!("timeout: health rpc did not complete within {timeout:?}"))??;
    match ServingStatus::try_from(status) {
        Ok(ServingStatus::Serving) => Ok(()),
        Ok(other) => Err(format!("service unhealthy (responded with {:?})", other.as_str_name())),
        Err(_) => Err(format!("service unhealthy (responded with {status})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_ports_resolve_through_the_container() {
        let c: Container = serde_yaml::from_str("name: c\nports: [{name: http, containerPort: 8080}]\n").unwrap();
        assert_eq!(port(&c, &IntOrString::String("http".into())), Ok(8080));
        assert_eq!(port(&c, &IntOrString::Int(9000)), Ok(9000));
        assert!(port(&c, &IntOrString::String("admin".into())).unwrap_err().contains("admin"));
    }

    #[tokio::test]
    async fn a_sleep_hook_sleeps_within_its_bound_and_a_tcp_hook_is_refused() {
        let h: LifecycleHandler = serde_yaml::from_str("sleep: {seconds: 30}").unwrap();
        let c = Container::default();
        let cri = Cri::disconnected();
        let started = std::time::Instant::now();
        let r = run(cri.clone(), &c, "id", &Action::of_hook(&h), Duration::from_millis(50), None).await;
        assert_eq!(r, Ok(()));
        assert!(started.elapsed() < Duration::from_secs(5), "bounded by the grace period");
        let h: LifecycleHandler = serde_yaml::from_str("tcpSocket: {port: 80}").unwrap();
        let r = run(cri, &c, "id", &Action::of_hook(&h), Duration::from_secs(1), None).await;
        assert!(r.unwrap_err().contains("not supported"));
    }
}
