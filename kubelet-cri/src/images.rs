//! Images as the kubelet handles them: ImageStatus before PullImage, and
//! imagePullPolicy deciding whether to pull.

use k8s_cri::v1 as cri;
use k8s_openapi::api::core::v1::Container;

use crate::cri::Cri;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

/// The container's policy, defaulted as the API server does: Always for
/// `:latest` or an untagged image, else IfNotPresent.
pub fn pull_policy(c: &Container) -> PullPolicy {
    match c.image_pull_policy.as_deref() {
        Some("Always") => PullPolicy::Always,
        Some("Never") => PullPolicy::Never,
        Some("IfNotPresent") => PullPolicy::IfNotPresent,
        _ => {
            let image = c.image.as_deref().unwrap_or_default();
            let name = image.rsplit('/').next().unwrap_or(image);
            let tag = if image.contains('@') { Some("digest") } else { name.split_once(':').map(|(_, t)| t) };
            if matches!(tag, None | Some("latest")) { PullPolicy::Always } else { PullPolicy::IfNotPresent }
        }
    }
}

/// Why an image could not be had, in the kubelet's words.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// `ErrImagePull`: the pull failed.
    #[error("pulling {image}: {message}")]
    Pull { image: String, message: String },
    /// `ErrImageNeverPull`: not present and the policy forbids pulling.
    #[error("image {0} is not present and imagePullPolicy is Never")]
    NeverPull(String),
    #[error("asking the runtime about image {image}: {message}")]
    Status { image: String, message: String },
}

impl ImageError {
    pub fn reason(&self) -> &'static str {
        match self {
            ImageError::Pull { .. } | ImageError::Status { .. } => "ErrImagePull",
            ImageError::NeverPull(_) => "ErrImageNeverPull",
        }
    }
}

/// Makes sure `image` is present, pulling per `policy`. Returns its id.
pub async fn ensure(
    cri: &mut Cri,
    image: &str,
    policy: PullPolicy,
    sandbox: &cri::PodSandboxConfig,
) -> Result<String, ImageError> {
    let spec = cri::ImageSpec { image: image.into(), user_specified_image: image.into(), ..Default::default() };
    let present = cri
        .images
        .image_status(cri::ImageStatusRequest { image: Some(spec.clone()), verbose: false })
        .await
        .map_err(|e| ImageError::Status { image: image.into(), message: e.message().into() })?
        .into_inner()
        .image
        .map(|i| i.id);
    match (present, policy) {
        (Some(id), PullPolicy::IfNotPresent | PullPolicy::Never) => return Ok(id),
        (None, PullPolicy::Never) => return Err(ImageError::NeverPull(image.into())),
        _ => {}
    }
    tracing::info!(image, "pulling image");
    let pulled = cri
        .images
        .pull_image(cri::PullImageRequest { image: Some(spec), auth: None, sandbox_config: Some(sandbox.clone()) })
        .await
        .map_err(|e| ImageError::Pull { image: image.into(), message: e.message().into() })?;
    Ok(pulled.into_inner().image_ref)
}

/// The user `image` runs as: its numeric uid, or its user name when it
/// names one; `None` when the runtime does not say.
pub async fn user(cri: &mut Cri, image: &str) -> Option<(Option<i64>, String)> {
    let spec = cri::ImageSpec { image: image.into(), user_specified_image: image.into(), ..Default::default() };
    let status = cri.images.image_status(cri::ImageStatusRequest { image: Some(spec), verbose: false }).await.ok()?;
    let image = status.into_inner().image?;
    Some((image.uid.map(|u| u.value), image.username))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(image: &str, policy: Option<&str>) -> Container {
        Container {
            name: "c".into(),
            image: Some(image.into()),
            image_pull_policy: policy.map(Into::into),
            ..Default::default()
        }
    }

    #[test]
    fn the_policy_defaults_as_the_api_server_does() {
        assert_eq!(pull_policy(&c("busybox", None)), PullPolicy::Always);
        assert_eq!(pull_policy(&c("busybox:latest", None)), PullPolicy::Always);
        assert_eq!(pull_policy(&c("127.0.0.1:5000/web", None)), PullPolicy::Always, "a registry port is no tag");
        assert_eq!(pull_policy(&c("127.0.0.1:5000/web:1", None)), PullPolicy::IfNotPresent);
        assert_eq!(pull_policy(&c("busybox@sha256:abc", None)), PullPolicy::IfNotPresent);
        assert_eq!(pull_policy(&c("busybox:1", Some("Always"))), PullPolicy::Always);
        assert_eq!(pull_policy(&c("busybox", Some("Never"))), PullPolicy::Never);
    }
}
