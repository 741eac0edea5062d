//! Revocation and rotation across node processes, without a restart: a
//! client certificate put on the CRL (`hie dev revoke`) is refused by every
//! node within seconds, on a connection it already holds open as well as on
//! new ones, while other clients go on; a node certificate replaced on disk
//! is served to the next connection.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hie_tests::*;

/// Within this time of a change on disk every node has taken it up
/// (`hie_api::TLS_RELOAD_INTERVAL` is 2 s; the rest is a busy machine).
const TAKE_UP: Duration = Duration::from_secs(10);

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Whether a search by `http` answers 200, is refused with 403 naming
/// revocation, or fails at the connection (`None`).
async fn outcome(http: &reqwest::Client, api: &str) -> Option<u16> {
    match search(http, api, &nhs(1), &[]).await {
        Ok(r) => {
            if r.status == 403 {
                let text = r.body.to_string();
                assert!(text.contains("revoked"), "403 that does not say revoked: {text}");
            }
            Some(r.status)
        }
        Err(_) => None,
    }
}

/// The serial number of the certificate a node's API presents to a new
/// connection.
fn served_serial(api_url: &str, ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<Vec<u8>> {
    let authority = api_url.trim_start_matches("https://").split('/').next().unwrap().to_owned();
    let host = authority.rsplit_once(':').unwrap().0.to_owned();
    let mut config = hie_pki::client_config(ca, Some((cert, key)))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = rustls_pki_types::ServerName::try_from(host)?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    let mut tcp = TcpStream::connect(&authority)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    let der =
        conn.peer_certificates().and_then(|c| c.first()).ok_or_else(|| anyhow::anyhow!("no server certificate"))?;
    let serial = hie_pki::CertId::of(der)?.serial;
    let _ = conn.writer().flush();
    Ok(serial)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_is_refused_everywhere_and_a_rotated_node_certificate_is_served_without_restart()
-> anyhow::Result<()> {
    let c = Cluster::up(&["--patients", "2"])?;
    let ids = c.node_ids();
    let pids: Vec<Option<i32>> = ids.iter().map(|&id| c.pid(id)).collect();
    // One client per node for the client to be revoked, each holding its
    // connection open, and one for a client that is not revoked.
    let doomed: Vec<reqwest::Client> = ids.iter().map(|_| c.http("out-of-hours-111")).collect();
    let other = c.http("ambulance-service");
    for (&id, http) in ids.iter().zip(&doomed) {
        assert_eq!(outcome(http, &c.api_url(id)).await, Some(200), "node {id} before revocation");
        assert_eq!(outcome(&other, &c.api_url(id)).await, Some(200));
    }

    let out = hie(&["dev", "revoke", "out-of-hours-111", "--dir", &c.dir_str()])?;
    assert!(out.contains("revoked out-of-hours-111"), "{out}");
    let again = hie(&["dev", "revoke", "out-of-hours-111", "--dir", &c.dir_str()])?;
    assert!(again.contains("already revoked"), "{again}");
    let revoked_at = Instant::now();

    // The connections held open are refused with 403 from their next request.
    for (&id, http) in ids.iter().zip(&doomed) {
        loop {
            match outcome(http, &c.api_url(id)).await {
                Some(403) => break,
                Some(200) if revoked_at.elapsed() < TAKE_UP => tokio::time::sleep(Duration::from_millis(200)).await,
                other => {
                    anyhow::bail!("node {id}, open connection, {:?} after revocation: {other:?}", revoked_at.elapsed())
                }
            }
        }
    }
    let taken_up = revoked_at.elapsed();
    for &id in &ids {
        // A new connection with the revoked certificate fails its handshake.
        let fresh = c.http("out-of-hours-111");
        assert_eq!(outcome(&fresh, &c.api_url(id)).await, None, "node {id}: new connection of a revoked client");
        assert_eq!(outcome(&other, &c.api_url(id)).await, Some(200), "node {id}: another client");
        let m = c.metrics(id).await.expect("metrics");
        assert_eq!(metric(&m, "hie_tls_revoked_certificates"), Some(1.0), "node {id}");
        assert!(metric(&m, "hie_tls_reloads_total").unwrap_or(0.0) >= 1.0, "node {id}");
        assert_eq!(metric(&m, "hie_tls_files_failing"), Some(0.0), "node {id}");
    }
    eprintln!("revocation in force on {} nodes after {taken_up:?}", ids.len());

    // Rotate node 1's certificate: a new key and certificate from the same CA.
    let certs = c.dir.path().join("certs");
    let ca = hie_pki::DevCa::load(&certs.join("ca.pem"), &certs.join("ca.key"))?;
    let node1 = ids[0];
    let cert_path = certs.join(format!("node-{node1}.pem"));
    let key_path = certs.join(format!("node-{node1}.key"));
    let before = hie_pki::CertId::of_pem_file(&cert_path)?.serial;
    let fresh = ca.issue_node(&format!("hie node {node1}"), &["localhost"], &["127.0.0.1".parse()?])?;
    let new_serial = {
        let tmp: PathBuf = certs.join("rotated.pem");
        std::fs::write(&tmp, &fresh.cert)?;
        hie_pki::CertId::of_pem_file(&tmp)?.serial
    };
    assert_ne!(before, new_serial);
    let amb = c.client_entry("ambulance-service");
    let (ca_pem, amb_cert, amb_key) = (
        PathBuf::from(c.file["ca_cert"].as_str().unwrap()),
        PathBuf::from(amb["cert"].as_str().unwrap()),
        PathBuf::from(amb["key"].as_str().unwrap()),
    );
    let api1 = c.api_url(node1);
    assert_eq!(served_serial(&api1, &ca_pem, &amb_cert, &amb_key)?, before);
    std::fs::write(&key_path, &fresh.key)?;
    std::fs::write(&cert_path, &fresh.cert)?;
    let rotated_at = Instant::now();
    loop {
        let serial = served_serial(&api1, &ca_pem, &amb_cert, &amb_key)?;
        if serial == new_serial {
            break;
        }
        assert_eq!(serial, before, "node {node1} serves a certificate that is neither the old nor the new");
        anyhow::ensure!(rotated_at.elapsed() < TAKE_UP, "rotated certificate not served after {TAKE_UP:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("rotated certificate served after {:?}", rotated_at.elapsed());
    assert_eq!(outcome(&other, &api1).await, Some(200), "a client after rotation");
    let m = c.metrics(node1).await.expect("metrics");
    assert!(metric(&m, "hie_tls_reloads_total").unwrap_or(0.0) >= 2.0, "revocation and rotation both taken up");
    let expiry = metric(&m, "hie_tls_cert_expiry_timestamp_seconds").unwrap_or(0.0) as i64;
    assert_eq!(expiry, hie_pki::not_after_unix(&cert_path)?, "the expiry gauge follows the rotated certificate");

    // No node restarted to do any of this.
    let after: Vec<Option<i32>> = ids.iter().map(|&id| c.pid(id)).collect();
    assert_eq!(pids, after);
    Ok(())
}
