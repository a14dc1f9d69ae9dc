//! `rediss://` against a real TLS listener: socat (OpenSSL) terminating TLS in front of the local
//! Redis, with the test's own CA; the URL takes Celery's `ssl_*` parameters, and the real Python
//! Celery reads, through the same URL, a result the Rust backend stored.

mod common;

use std::time::Duration;

use common::tls::{Pki, TlsListener};
use serde_json::json;
use task_core::{ResultBackend, TaskMeta, TaskState};

fn with_ca(url: &str, pki: &Pki) -> String {
    format!(
        "{url}?ssl_cert_reqs=required&ssl_ca_certs={}",
        pki.path("ca.pem")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_verifies_the_server_and_carries_results_python_celery_reads() {
    let pki = Pki::make();
    let tls = TlsListener::start(&pki, 6379, false);
    let url = with_ca(&tls.url("rediss", "localhost"), &pki);

    let backend = task_core::RedisBackend::connect(&url)
        .await
        .expect("TLS to Redis with the test CA");
    let id = uuid::Uuid::new_v4().to_string();
    backend
        .store(&TaskMeta::new(&id, TaskState::Success, json!({"sum": 5})))
        .await
        .unwrap();
    let back = backend.get(&id).await.unwrap().expect("stored over TLS");
    assert_eq!(back.result, json!({"sum": 5}));
    // Waiting for a result uses a second (RESP3 push) connection, also over TLS.
    let waited = backend.wait(&id, Duration::from_secs(5)).await.unwrap();
    assert_eq!(waited.status, TaskState::Success);

    // Celery and redis-py, given the same URL, read it.
    let script = format!(
        "from celery import Celery\n\
         app = Celery(backend={url:?})\n\
         print(app.AsyncResult({id:?}).get(timeout=10))\n"
    );
    let out = std::process::Command::new(common::python())
        .args(["-c", &script])
        .output()
        .expect("run the virtualenv's python");
    assert!(
        out.status.success(),
        "celery over rediss: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "{'sum': 5}");

    // The system's trust store does not know the test CA, and the certificate names localhost.
    let untrusted = task_core::RedisBackend::connect(&tls.url("rediss", "localhost"))
        .await
        .expect_err("an unknown issuer is refused");
    let wrong_name =
        task_core::RedisBackend::connect(&with_ca(&tls.url("rediss", "127.0.0.1"), &pki))
            .await
            .expect_err("a name the certificate does not carry is refused");
    // Celery's "no verification" is refused before connecting.
    let insecure = format!("{}?ssl_cert_reqs=none", tls.url("rediss", "localhost"));
    let off = task_core::RedisBackend::connect(&insecure)
        .await
        .expect_err("ssl_cert_reqs=none is refused");
    assert!(off.to_string().contains("always verified"), "{off}");
    // Plain RESP to the TLS port never works.
    assert!(
        task_core::RedisBackend::connect(&tls.url("redis", "localhost"))
            .await
            .is_err()
    );
    println!("rediss round trip and Celery read ok; refused: {untrusted}; {wrong_name}");
}

#[tokio::test]
async fn rediss_presents_a_client_certificate_where_the_server_requires_one() {
    let pki = Pki::make();
    let tls = TlsListener::start(&pki, 6379, true);
    let url = format!(
        "{}&ssl_certfile={}&ssl_keyfile={}",
        with_ca(&tls.url("rediss", "localhost"), &pki),
        pki.path("client.pem"),
        pki.path("client.key")
    );
    let backend = task_core::RedisBackend::connect(&url)
        .await
        .expect("TLS with a client certificate");
    let id = uuid::Uuid::new_v4().to_string();
    backend
        .store(&TaskMeta::new(&id, TaskState::Success, json!(1)))
        .await
        .unwrap();
    assert!(backend.get(&id).await.unwrap().is_some());
    assert!(
        task_core::RedisBackend::connect(&with_ca(&tls.url("rediss", "localhost"), &pki))
            .await
            .is_err(),
        "without a client certificate the listener hangs up"
    );
}
