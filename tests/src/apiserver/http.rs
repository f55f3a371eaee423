//! The HTTP face of the test API server: the Kubernetes REST paths for the
//! kinds in `store`, list and watch (chunked JSON event lines, bookmarks,
//! 410 Gone as an ERROR event), create/replace/patch/delete, and faults.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::{Query, State},
    http::{Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{
    Shared,
    selector::{FieldSelector, LabelSelector, labels_of},
    store::{ApiError, Event, EventType, Kind},
};

/// A parsed resource path.
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_string(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(name.to_string()), None),
        [plural, name, sub] => (*plural, Some(name.to_string()), Some(sub.to_string())),
        _ => return None,
    };
    Some(Target { kind: Kind::from_path(&gv, plural)?, namespace, name, subresource: sub })
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

fn error(e: ApiError) -> Response {
    json_response(StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), &e.status())
}

struct Filter {
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn matches(&self, object: &Value) -> bool {
        let ns = object.pointer("/metadata/namespace").and_then(Value::as_str);
        self.namespace.as_deref().is_none_or(|n| ns == Some(n))
            && self.labels.matches(&labels_of(object))
            && self.fields.matches(object)
    }
}

pub(super) async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    shared.requests.lock().unwrap().push(format!("{method} {uri}"));
    if shared.fail_requests.load(Ordering::Relaxed) {
        return error(ApiError::new(500, "InternalError", "injected failure"));
    }
    // An API server that takes requests and never answers them.
    while shared.hang_requests.load(Ordering::Relaxed) {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    if uri.path() == "/version" {
        return json_response(
            StatusCode::OK,
            &json!({"major": "1", "minor": "34", "gitVersion": "v1.34.0-kpr-test", "platform": "linux/amd64"}),
        );
    }
    let Some(target) = parse_path(uri.path()) else {
        return error(ApiError::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({})", uri.path()),
        ));
    };
    let filter = match (
        LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str)),
        FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str)),
    ) {
        (Ok(labels), Ok(fields)) => Filter { namespace: target.namespace.clone(), labels, fields },
        (Err(e), _) | (_, Err(e)) => return error(ApiError::new(400, "BadRequest", e)),
    };
    let body_json =
        || serde_json::from_slice::<Value>(&body).map_err(|e| ApiError::new(400, "BadRequest", e.to_string()));
    let kind = target.kind;
    let ns = target.namespace.clone().unwrap_or_default();

    match (method, &target.name) {
        (Method::GET, None) if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) => {
            watch(shared, kind, filter, &query)
        }
        (Method::GET, None) => {
            let store = shared.store.lock().unwrap();
            let items: Vec<Value> =
                store.list(kind, target.namespace.as_deref()).into_iter().filter(|o| filter.matches(o)).collect();
            json_response(
                StatusCode::OK,
                &json!({
                    "kind": format!("{}List", kind.name()), "apiVersion": kind.group_version(),
                    "metadata": {"resourceVersion": store.resource_version().to_string()},
                    "items": items,
                }),
            )
        }
        (Method::GET, Some(name)) => match shared.store.lock().unwrap().get(kind, &ns, name) {
            Ok(o) => json_response(StatusCode::OK, &o),
            Err(e) => error(e),
        },
        (Method::POST, None) => {
            let result = body_json().and_then(|mut o| {
                if let Some(n) = &target.namespace {
                    o["metadata"]["namespace"] = n.clone().into();
                }
                shared.store.lock().unwrap().create(kind, o)
            });
            match result {
                Ok(o) => json_response(StatusCode::CREATED, &o),
                Err(e) => error(e),
            }
        }
        (Method::POST, Some(name))
            if kind == Kind::ServiceAccount && target.subresource.as_deref() == Some("token") =>
        {
            let result = body_json().and_then(|request| {
                shared.store.lock().unwrap().get(kind, &ns, name)?;
                Ok(issue_token(&ns, name, request))
            });
            match result {
                Ok(o) => json_response(StatusCode::CREATED, &o),
                Err(e) => error(e),
            }
        }
        (Method::PUT, Some(_)) => match body_json().and_then(|o| shared.store.lock().unwrap().update(kind, o)) {
            Ok(o) => json_response(StatusCode::OK, &o),
            Err(e) => error(e),
        },
        (Method::PATCH, Some(name)) => {
            // JSON merge patch (also how strategic merge patches of the
            // fields this project writes behave); `status` patches only status.
            let result = body_json().and_then(|patch| {
                let mut store = shared.store.lock().unwrap();
                let mut object = store.get(kind, &ns, name)?;
                // A uid in the patch is a precondition, as the API server takes it.
                if let Some(uid) = patch.pointer("/metadata/uid").and_then(Value::as_str)
                    && object.pointer("/metadata/uid").and_then(Value::as_str) != Some(uid)
                {
                    return Err(ApiError::new(
                        409,
                        "Conflict",
                        format!(
                            "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                            object["metadata"]["uid"]
                        ),
                    ));
                }
                let patch = match target.subresource.as_deref() {
                    Some("status") => json!({"status": patch.get("status").cloned().unwrap_or(Value::Null)}),
                    _ => patch,
                };
                merge(&mut object, &patch);
                object["metadata"]["resourceVersion"] = Value::Null;
                store.update(kind, object)
            });
            match result {
                Ok(o) => json_response(StatusCode::OK, &o),
                Err(e) => error(e),
            }
        }
        (Method::DELETE, Some(name)) => {
            // DeleteOptions, in the body or the query.
            let grace = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|o| o.get("gracePeriodSeconds").and_then(Value::as_i64))
                .or_else(|| query.get("gracePeriodSeconds").and_then(|g| g.parse().ok()));
            match shared.store.lock().unwrap().delete(kind, &ns, name, grace) {
                Ok(o) => json_response(StatusCode::OK, &o),
                Err(e) => error(e),
            }
        }
        (m, _) => error(ApiError::new(405, "MethodNotAllowed", format!("{m} is not supported here"))),
    }
}

/// A TokenRequest answered as the API server's token issuer does: a JWT
/// (`header.claims.signature`, base64url) for the service account, bound
/// to the object the request names, with the audiences and lifetime asked.
/// The signature is a stand-in: nothing here verifies it.
fn issue_token(namespace: &str, account: &str, request: Value) -> Value {
    let spec = request.get("spec").cloned().unwrap_or(Value::Null);
    let lifetime = spec.get("expirationSeconds").and_then(Value::as_i64).unwrap_or(3600);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let bound = spec.get("boundObjectRef").cloned().unwrap_or(Value::Null);
    let audiences = spec.get("audiences").cloned().filter(|a| a.as_array().is_some_and(|a| !a.is_empty()));
    let claims = json!({
        "aud": audiences.unwrap_or_else(|| json!(["https://kubernetes.default.svc"])),
        "exp": now + lifetime, "iat": now, "nbf": now,
        "iss": "https://kubernetes.default.svc",
        "sub": format!("system:serviceaccount:{namespace}:{account}"),
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": account},
            "pod": {"name": bound.get("name"), "uid": bound.get("uid")},
        },
    });
    let token =
        [json!({"alg": "RS256", "kid": "kpr-test"}).to_string(), claims.to_string(), "kpr-test-signature".into()]
            .map(|part| base64url(part.as_bytes()))
            .join(".");
    let expires = k8s_openapi::jiff::Timestamp::from_second(now + lifetime).map(|t| t.to_string()).unwrap_or_default();
    json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "metadata": {"name": account, "namespace": namespace},
        "spec": spec,
        "status": {"token": token, "expirationTimestamp": expires},
    })
}

/// Unpadded base64url (RFC 4648 §5), as JWTs use.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

fn line(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

/// What `event` looks like to a watch with `filter`: selector changes turn
/// modifications into ADDED or DELETED, as the API server's watch cache does.
fn view(event: &Event, filter: &Filter) -> Option<Value> {
    let now = filter.matches(&event.object);
    let type_ = match (event.type_, event.old.as_ref().map(|o| filter.matches(o))) {
        (EventType::Modified, Some(true)) if now => "MODIFIED",
        (EventType::Modified, Some(true)) => "DELETED",
        (EventType::Modified, _) if now => "ADDED",
        (EventType::Modified, _) => return None,
        (t, _) if now => t.as_str(),
        _ => return None,
    };
    Some(json!({"type": type_, "object": event.object}))
}

fn watch(shared: Arc<Shared>, kind: Kind, filter: Filter, query: &HashMap<String, String>) -> Response {
    let from = query.get("resourceVersion").and_then(|v| v.parse::<u64>().ok());
    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = query.get("timeoutSeconds").and_then(|v| v.parse::<u64>().ok()).map(Duration::from_secs);
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(1024);
    let start = shared.store.lock().unwrap().watch(kind, from);
    let mut dropped = shared.drop_watches.subscribe();
    let bookmark_every = *shared.bookmark_interval.lock().unwrap();
    let store = shared.clone();
    tokio::spawn(async move {
        let mut start = match start {
            Ok(s) => s,
            Err(e) => {
                // A watch from an expired version is answered with an ERROR
                // event carrying a 410 Status, then closed.
                tx.send(Ok(line(&json!({"type": "ERROR", "object": e.status()})))).await.ok();
                return;
            }
        };
        let mut last_rv = from.unwrap_or(0);
        for event in &start.backlog {
            last_rv = last_rv.max(event.rv);
            if let Some(v) = view(event, &filter)
                && tx.send(Ok(line(&v))).await.is_err()
            {
                return;
            }
        }
        let mut tick = tokio::time::interval(bookmark_every);
        tick.tick().await;
        let deadline = tokio::time::sleep(timeout.unwrap_or(Duration::from_secs(3600)));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                ev = start.live.recv() => match ev {
                    Ok(event) if event.kind == kind && event.rv > last_rv => {
                        last_rv = event.rv;
                        if let Some(v) = view(&event, &filter)
                            && tx.send(Ok(line(&v))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // Lagged or closed: end the watch; the client resumes.
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let rv = store.store.lock().unwrap().resource_version().max(last_rv);
                    let bookmark = json!({"type": "BOOKMARK", "object": {
                        "kind": kind.name(), "apiVersion": kind.group_version(),
                        "metadata": {"resourceVersion": rv.to_string()}}});
                    if tx.send(Ok(line(&bookmark))).await.is_err() {
                        return;
                    }
                }
                _ = dropped.changed() => return,
                _ = &mut deadline => return,
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let t = parse_path("/api/v1/namespaces/default/services/web").unwrap();
        assert_eq!((t.kind, t.namespace.as_deref(), t.name.as_deref()), (Kind::Service, Some("default"), Some("web")));
        let t = parse_path("/apis/discovery.k8s.io/v1/endpointslices").unwrap();
        assert_eq!((t.kind, t.namespace, t.name), (Kind::EndpointSlice, None, None));
        let t = parse_path("/api/v1/namespaces/ns/pods/p/status").unwrap();
        assert_eq!(t.subresource.as_deref(), Some("status"));
        assert!(parse_path("/api/v1/persistentvolumes").is_none(), "a kind this server does not serve");
        let t = parse_path("/api/v1/namespaces/default/serviceaccounts/default/token").unwrap();
        assert_eq!((t.kind, t.subresource.as_deref()), (Kind::ServiceAccount, Some("token")));
        let t = parse_path("/api/v1/nodes/n1").unwrap();
        assert_eq!((t.kind, t.name.as_deref()), (Kind::Node, Some("n1")));
    }

    #[test]
    fn base64url_is_unpadded_and_url_safe() {
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"foob"), "Zm9vYg");
        assert_eq!(base64url(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn merge_patch() {
        let mut o = json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge(&mut o, &json!({"a": {"b": null, "e": 3}, "d": [2]}));
        assert_eq!(o, json!({"a": {"c": 2, "e": 3}, "d": [2]}));
    }
}
