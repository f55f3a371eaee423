//! The test API server speaks the Kubernetes list/watch protocol to the
//! unmodified kube client, inside a network namespace of the test's own.

use std::{net::TcpListener, sync::Arc, time::Duration};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use kpr_tests::{
    apiserver::ApiServer,
    netns::{Netns, run_in, unique_prefix},
    objects::{service, slice},
    root_or_skip,
};
use kube::{
    Api, Client, Config,
    api::{ListParams, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};

/// Runs `test` with a client for a fresh server, all inside a new namespace.
fn with_server<F, Fut>(test: F)
where
    F: FnOnce(ApiServer, Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let ns = Netns::new(&format!("{}-api", unique_prefix())).unwrap();
    let name = ns.name().to_string();
    ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let bind_ns = name.clone();
            let api = ApiServer::start(Arc::new(move |port| {
                run_in(&bind_ns, move || TcpListener::bind(("127.0.0.1", port))).unwrap()
            }))
            .unwrap();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("kubeconfig");
            api.write_kubeconfig(&path).unwrap();
            let config =
                Config::from_custom_kubeconfig(Kubeconfig::read_from(&path).unwrap(), &KubeConfigOptions::default())
                    .await
                    .unwrap();
            test(api, Client::try_from(config).unwrap()).await;
        });
    })
    .unwrap();
}

#[test]
fn lists_and_gets_with_selectors() {
    root_or_skip!();
    with_server(|api, client| async move {
        api.create(&service("a", [10, 96, 0, 1].into(), &[("app", "x")])).unwrap();
        api.create(&service("b", [10, 96, 0, 2].into(), &[("app", "y")])).unwrap();
        let services: Api<Service> = Api::all(client.clone());
        let all = services.list(&ListParams::default()).await.unwrap();
        assert_eq!(all.items.len(), 2);
        assert!(all.metadata.resource_version.is_some());
        let x = services.list(&ListParams::default().labels("app=x")).await.unwrap();
        assert_eq!(x.items.iter().map(|s| s.metadata.name.clone().unwrap()).collect::<Vec<_>>(), ["a"]);
        let named: Api<Service> = Api::namespaced(client.clone(), "default");
        assert_eq!(named.get("b").await.unwrap().spec.unwrap().cluster_ip.as_deref(), Some("10.96.0.2"));
        assert!(named.get("missing").await.is_err());
        for (name, node) in [("here", "node-1"), ("there", "node-2")] {
            let pod = serde_json::json!({
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"nodeName": node, "containers": []},
            });
            api.create(&serde_json::from_value::<Pod>(pod).unwrap()).unwrap();
        }
        let pods: Api<Pod> = Api::all(client);
        let on = |node: &str| {
            let pods = pods.clone();
            let selector = format!("spec.nodeName={node}");
            async move {
                let list = pods.list(&ListParams::default().fields(&selector)).await.unwrap();
                list.items.into_iter().map(|p| p.metadata.name.unwrap()).collect::<Vec<_>>()
            }
        };
        assert_eq!(on("node-1").await, ["here"]);
        assert!(on("node-3").await.is_empty());
    });
}

#[test]
fn watches_resume_send_bookmarks_and_expire_with_410() {
    root_or_skip!();
    with_server(|api, client| async move {
        api.set_bookmark_interval(Duration::from_millis(100));
        let slices: Api<EndpointSlice> = Api::all(client);
        let rv = slices.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap();
        api.create(&slice("s-1", "web", &[("p", [10, 244, 0, 1].into())])).unwrap();
        let wp = WatchParams::default().labels("kubernetes.io/service-name=web").timeout(5);
        let mut stream = slices.watch(&wp, &rv).await.unwrap().boxed();
        assert!(
            matches!(stream.try_next().await.unwrap(), Some(WatchEvent::Added(s)) if s.metadata.name.as_deref() == Some("s-1"))
        );
        api.apply(&slice("s-1", "web", &[])).unwrap();
        assert!(matches!(stream.try_next().await.unwrap(), Some(WatchEvent::Modified(_))));
        api.delete::<EndpointSlice>("default", "s-1").unwrap();
        assert!(matches!(stream.try_next().await.unwrap(), Some(WatchEvent::Deleted(_))));
        assert!(matches!(stream.try_next().await.unwrap(), Some(WatchEvent::Bookmark(_))));

        // After a restart the history is gone: the old version is expired.
        let mut api = api;
        api.restart().unwrap();
        let mut stream = slices.watch(&wp, &rv).await.unwrap().boxed();
        match stream.try_next().await.unwrap() {
            Some(WatchEvent::Error(e)) => assert_eq!(e.code, 410),
            other => panic!("expected 410 Gone, got {other:?}"),
        }
    });
}
