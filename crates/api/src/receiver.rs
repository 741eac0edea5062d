//! A subscription endpoint for tests and `hie subscribe`: HTTPS on loopback with a certificate
//! from the cluster's dev CA, client certificates required and checked
//! against the same CA (so a node must present its certificate), keeping
//! every notification it acknowledges. It can be told to fail with 500 or to
//! hang (a timeout for the sender) for a while.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    Accept = 0,
    Fail500 = 1,
    /// Never answers (the sender times out).
    Hang = 2,
}

/// One notification received and acknowledged.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub bundle: Value,
}

impl Received {
    fn status(&self) -> &Value {
        &self.bundle["entry"][0]["resource"]
    }

    fn param(&self, name: &str) -> Option<&Value> {
        self.status()["parameter"].as_array()?.iter().find(|p| p["name"] == name)
    }

    /// `handshake`, `heartbeat` or `event-notification`.
    pub fn kind(&self) -> &str {
        self.param("type").and_then(|p| p["valueCode"].as_str()).unwrap_or("")
    }

    pub fn subscription(&self) -> &str {
        self.param("subscription").and_then(|p| p["valueReference"]["reference"].as_str()).unwrap_or("")
    }

    /// (event number, focus reference) of each event, in order.
    pub fn events(&self) -> Vec<(u64, Option<String>)> {
        let Some(params) = self.status()["parameter"].as_array() else { return vec![] };
        params
            .iter()
            .filter(|p| p["name"] == "notification-event")
            .map(|p| {
                let parts = p["part"].as_array().cloned().unwrap_or_default();
                let part = |n: &str| parts.iter().find(|x| x["name"] == n).cloned();
                let number = part("event-number")
                    .and_then(|x| x["valueString"].as_str().and_then(|s| s.parse().ok()))
                    .unwrap_or(0);
                let focus = part("focus").and_then(|x| x["valueReference"]["reference"].as_str().map(str::to_owned));
                (number, focus)
            })
            .collect()
    }
}

pub struct Receiver {
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    got: Arc<Mutex<Vec<Received>>>,
    attempts: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The most a receiver reads of one request.
const BODY_BYTES_MAX: usize = 16 << 20;

impl Receiver {
    /// Starts on 127.0.0.1 with a certificate issued by the dev CA
    /// (`ca_cert`, `ca_key`), written into `dir`; it accepts clients whose
    /// certificate that CA issued.
    pub async fn start(ca_cert: &Path, ca_key: &Path, dir: &Path) -> Result<Receiver, Error> {
        let ca = hie_pki::DevCa::load(ca_cert, ca_key)?;
        let pem = ca.issue_node("receiver", &["localhost"], &[std::net::IpAddr::from([127, 0, 0, 1])])?;
        std::fs::create_dir_all(dir)?;
        let (cert, key) = (dir.join("receiver.pem"), dir.join("receiver.key"));
        std::fs::write(&cert, &pem.cert)?;
        std::fs::write(&key, &pem.key)?;
        let files = hie_pki::TlsFiles { cert, key, ca: ca_cert.to_owned(), crl: None };
        let mut tls = hie_pki::server_config(&files)?;
        // This receiver speaks HTTP/1.1 only.
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tls = Arc::new(tls);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mode = Arc::new(AtomicU8::new(Mode::Accept as u8));
        let got = Arc::new(Mutex::new(vec![]));
        let attempts = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (m, g, a) = (mode.clone(), got.clone(), attempts.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, m, g, a) = (acceptor.clone(), m.clone(), g.clone(), a.clone());
                tokio::spawn(async move {
                    let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await else {
                        return;
                    };
                    let _ = Box::pin(serve(tls, m, g, a)).await;
                });
            }
        });
        Ok(Receiver { addr, mode, got, attempts, task })
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}/notify", self.addr.port())
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// Requests that reached the receiver (answered or not).
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::SeqCst)
    }

    pub fn received(&self) -> Vec<Received> {
        self.got.lock().expect("receiver lock").clone()
    }

    /// Every event number acknowledged for `subscription` (an id), in arrival order.
    pub fn event_numbers(&self, subscription: &str) -> Vec<u64> {
        self.received()
            .iter()
            .filter(|r| r.subscription().ends_with(&format!("/Subscription/{subscription}")))
            .flat_map(|r| r.events().into_iter().map(|e| e.0))
            .collect()
    }

    /// Waits until `done` holds for what was received, or `timeout`.
    pub async fn wait_for(&self, timeout: Duration, done: impl Fn(&[Received]) -> bool) -> bool {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if done(&self.received()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        done(&self.received())
    }
}

async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut io: S,
    mode: Arc<AtomicU8>,
    got: Arc<Mutex<Vec<Received>>>,
    attempts: Arc<std::sync::atomic::AtomicU64>,
) -> Result<(), Error> {
    let mut buf = Vec::new();
    loop {
        // The head.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 8192];
            let n = io.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() >= BODY_BYTES_MAX {
                return Err("request too large".into());
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
            .unwrap_or(0);
        if length >= BODY_BYTES_MAX {
            return Err("request too large".into());
        }
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 8192];
            let n = io.read(&mut chunk).await?;
            if n == 0 {
                return Err("closed mid-body".into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body: Vec<u8> = buf[head_end..head_end + length].to_vec();
        buf.drain(..head_end + length);
        attempts.fetch_add(1, Ordering::SeqCst);
        match mode.load(Ordering::SeqCst) {
            x if x == Mode::Hang as u8 => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return Ok(());
            }
            x if x == Mode::Fail500 as u8 => {
                io.write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n").await?;
            }
            _ => {
                let bundle: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                got.lock().expect("receiver lock").push(Received { at: Instant::now(), bundle });
                io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await?;
            }
        }
        io.flush().await?;
    }
}
