//! Lanes: one long-lived stream to each peer for the small, frequent
//! messages (append-entries, votes, forwarded writes, read-index), with many
//! requests in flight on it at once.
//!
//! libp2p's request-response opens a new yamux substream for every request:
//! a protocol negotiation, the length, the message and a close, each its own
//! yamux frame, Noise message and TCP write, and the same again for the
//! response. Under write load that was about eight TCP writes per forwarded
//! write, and a quarter of each node's CPU in its connection tasks. A lane
//! negotiates once; every message is then one frame, and whatever is
//! waiting when the writer runs goes out in one write.
//!
//! A frame is `[len: u32][id: u64][status: u8][len bytes]`, big-endian.
//! Requests and responses carry the same id; a response's status says
//! whether the payload is a `Response` or the reason the peer refused the
//! request (a message it could not decode). `len` is bounded by
//! `message_bytes_max`: a peer that sends more has broken the protocol, and
//! its lane is closed.
//!
//! A new lane starts with a hello each way, and a lane is closed and opened
//! again when a request its caller still waits for has gone unanswered for
//! `LANE_SILENCE_MAX` with nothing at all heard from the peer since.
//!
//! Delivery is what request-response promised: a request never written gets
//! [`SendError::Unreachable`] (safe to retry elsewhere), one written on a lane
//! that then broke gets [`SendError::Failed`], and requests whose caller has
//! given up (timed out) before they were written are dropped, not sent late.
//! Snapshot chunks and audit queries, large and rare, stay on
//! request-response, so that they never hold up a lane.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::io::{BufReader, ReadHalf, WriteHalf};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, FutureExt, StreamExt};
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::service::{Inbound, P2pCounters, SendError};
use crate::wire::{Request, Response};

pub const LANE_PROTOCOL: StreamProtocol = StreamProtocol::new("/hie/lane/1");

/// Requests waiting to be written to one peer's lane; past this, a sender
/// waits (within its timeout).
pub const LANE_QUEUE_MAX: usize = 1024;
/// Requests written on one lane and not yet answered; past this, a request
/// fails at once instead of being sent.
pub const LANE_IN_FLIGHT_MAX: usize = 4096;
/// About the most bytes gathered into one write (a single larger frame still
/// goes alone).
pub const LANE_WRITE_BYTES_MAX: usize = 256 << 10;
/// Lanes from peers served at once; a further one is closed at once.
pub const LANES_INBOUND_MAX: usize = 64;
/// Read buffer of a lane.
const READ_BUFFER_BYTES: usize = 64 << 10;
/// After a lane could not be opened, the next attempt waits this long
/// (requests meanwhile fail as unreachable rather than pile up).
const REOPEN_BACKOFF: Duration = Duration::from_millis(100);

const HEADER_BYTES: usize = 4 + 8 + 1;
const STATUS_OK: u8 = 0;
const STATUS_REFUSED: u8 = 1;
/// The first frame each way on a new lane (id 0, no payload): the peer has
/// taken the lane and serves it. libp2p drops an inbound stream its
/// acceptor is not ready for, and a lane to nowhere would accept writes
/// and never answer.
const STATUS_HELLO: u8 = 2;
/// How long opening a lane may take. Opening dials the peer if it is not
/// connected; an open that raced a connection being set up can wait for
/// nothing, so it is given up and tried again.
pub const LANE_OPEN_TIMEOUT: Duration = Duration::from_secs(2);
/// A lane with requests waiting whose peer has sent nothing for this long
/// is closed and opened again.
pub const LANE_SILENCE_MAX: Duration = Duration::from_secs(10);
/// How long a new lane waits for the peer's hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a lane with requests in flight checks that its peer still
/// answers.
const SILENCE_CHECK: Duration = Duration::from_millis(500);

type Reply = oneshot::Sender<Result<Response, SendError>>;
/// Requests written and not yet answered, by id: where to answer, and when
/// each was written.
type InFlight = Mutex<HashMap<u64, (Reply, Instant)>>;

/// A request waiting for its lane's writer.
struct Outgoing {
    payload: Vec<u8>,
    reply: Reply,
    deadline: Instant,
}

/// The lanes of this node: outbound ones by peer, and the accepting of
/// inbound ones.
pub(crate) struct Lanes {
    control: libp2p_stream::Control,
    outbound: Mutex<HashMap<PeerId, mpsc::Sender<Outgoing>>>,
    counters: Arc<P2pCounters>,
    message_bytes_max: usize,
    request_timeout: Duration,
}

impl Lanes {
    /// Starts accepting peers' lanes; requests on them go to `inbound`.
    pub(crate) fn start(
        mut control: libp2p_stream::Control,
        inbound: Arc<dyn Inbound>,
        counters: Arc<P2pCounters>,
        message_bytes_max: usize,
        request_timeout: Duration,
        concurrent_requests_max: usize,
    ) -> Lanes {
        let mut incoming = control.accept(LANE_PROTOCOL).expect("the lane protocol is registered once");
        let served = Arc::new(AtomicUsize::new(0));
        let counters2 = counters.clone();
        tokio::spawn(async move {
            while let Some((peer, stream)) = incoming.next().await {
                if served.fetch_add(1, Ordering::Relaxed) >= LANES_INBOUND_MAX {
                    served.fetch_sub(1, Ordering::Relaxed);
                    tracing::warn!(%peer, limit = LANES_INBOUND_MAX, "refused a lane: too many open");
                    continue;
                }
                let (inbound, counters, served) = (inbound.clone(), counters2.clone(), served.clone());
                tokio::spawn(async move {
                    serve(peer, stream, inbound, counters, message_bytes_max, concurrent_requests_max).await;
                    served.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        Lanes { control, outbound: Mutex::new(HashMap::new()), counters, message_bytes_max, request_timeout }
    }

    /// Sends `request` to `peer` on its lane and waits for the response,
    /// within the request timeout.
    pub(crate) async fn request(&self, peer: PeerId, request: &Request) -> Result<Response, SendError> {
        let payload = hie_domain::codec::encode(request);
        if payload.len() > self.message_bytes_max {
            let e = crate::codec::TooLarge { bytes: payload.len(), max: self.message_bytes_max };
            return Err(SendError::TooLarge(peer, e.to_string()));
        }
        self.counters.requests_sent.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + self.request_timeout;
        let lane = self.lane(peer);
        let (reply, answer) = oneshot::channel();
        let result = tokio::time::timeout_at(deadline, async {
            lane.send(Outgoing { payload, reply, deadline }).await.map_err(|_| SendError::Stopped)?;
            answer.await.map_err(|_| SendError::Stopped)?
        })
        .await
        .unwrap_or(Err(SendError::Timeout(peer)));
        if result.is_err() {
            self.counters.outbound_failures.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Forgets `peer`'s lane (it has left the membership); its task ends.
    pub(crate) fn forget(&self, peer: &PeerId) {
        self.outbound.lock().expect("lanes lock").remove(peer);
    }

    fn lane(&self, peer: PeerId) -> mpsc::Sender<Outgoing> {
        let mut lanes = self.outbound.lock().expect("lanes lock");
        lanes
            .entry(peer)
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(LANE_QUEUE_MAX);
                tokio::spawn(run_outbound(peer, self.control.clone(), rx, self.message_bytes_max));
                tx
            })
            .clone()
    }
}

/// One peer's outbound lane: opens the stream when there is something to
/// send, writes requests and hands responses back, and reopens it after it
/// breaks. Ends when the lane is forgotten or the transport stops.
async fn run_outbound(
    peer: PeerId,
    mut control: libp2p_stream::Control,
    mut queue: mpsc::Receiver<Outgoing>,
    message_bytes_max: usize,
) {
    loop {
        let Some(first) = queue.recv().await else { return };
        let stream = match open(&mut control, peer, message_bytes_max).await {
            Ok(stream) => stream,
            Err(why) => {
                tracing::debug!(%peer, error = %why, "lane not opened");
                // Nothing was written: these may be retried elsewhere.
                let _ = first.reply.send(Err(SendError::Unreachable(peer, why.clone())));
                while let Ok(o) = queue.try_recv() {
                    let _ = o.reply.send(Err(SendError::Unreachable(peer, why.clone())));
                }
                tokio::time::sleep(REOPEN_BACKOFF).await;
                continue;
            }
        };
        tracing::info!(%peer, "lane opened");
        let (read, write) = stream.split();
        let in_flight: Arc<InFlight> = Arc::default();
        let heard = Arc::new(Heard::new());
        let mut reader = tokio::spawn(read_responses(peer, read, in_flight.clone(), heard.clone(), message_bytes_max));
        let lane = Lane { peer, in_flight: &in_flight, heard: &heard };
        let why = tokio::select! {
            e = write_requests(write, &mut queue, first, lane) => e,
            r = &mut reader => match r {
                Ok(e) => e,
                Err(e) => io::Error::other(e.to_string()),
            },
        };
        reader.abort();
        tracing::info!(%peer, error = %why, "lane closed");
        // Written, so possibly delivered: not `Unreachable`.
        for (_, (reply, _)) in in_flight.lock().expect("in-flight lock").drain() {
            let _ = reply.send(Err(SendError::Failed(peer, format!("the lane closed: {why}"))));
        }
    }
}

/// Opens a lane to `peer` and exchanges hellos, each step bounded; why not.
async fn open(control: &mut libp2p_stream::Control, peer: PeerId, max: usize) -> Result<Stream, String> {
    let mut stream = match tokio::time::timeout(LANE_OPEN_TIMEOUT, control.open_stream(peer, LANE_PROTOCOL)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("opening the lane timed out".into()),
    };
    match tokio::time::timeout(HELLO_TIMEOUT, hello(&mut stream, max)).await {
        Ok(Ok(())) => Ok(stream),
        Ok(Err(e)) => Err(format!("the lane was not taken: {e}")),
        Err(_) => Err("the peer did not greet the lane in time".into()),
    }
}

/// Sends a hello on a new lane and waits for the peer's.
async fn hello(stream: &mut Stream, max: usize) -> io::Result<()> {
    write_all(stream, &frame(0, STATUS_HELLO, &[])).await?;
    match read_frame(stream, max).await? {
        Some((0, STATUS_HELLO, _)) => Ok(()),
        Some(_) => Err(io::Error::new(io::ErrorKind::InvalidData, "the peer's first frame was not a hello")),
        None => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the lane")),
    }
}

/// When a lane last heard from its peer.
struct Heard {
    since: Instant,
    millis: std::sync::atomic::AtomicU64,
}

impl Heard {
    fn new() -> Heard {
        Heard { since: Instant::now(), millis: 0.into() }
    }

    fn now(&self) {
        self.millis.store(self.since.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        self.since.elapsed().saturating_sub(Duration::from_millis(self.millis.load(Ordering::Relaxed)))
    }
}

/// An open outbound lane, as its writer sees it.
struct Lane<'a> {
    peer: PeerId,
    in_flight: &'a InFlight,
    heard: &'a Heard,
}

impl Lane<'_> {
    /// Dead if a request its caller still waits for was written more than
    /// `LANE_SILENCE_MAX` ago and the peer has sent nothing since. Requests whose
    /// callers have given up are forgotten here: an idle lane is not a dead
    /// one.
    fn check_alive(&self) -> io::Result<()> {
        let oldest = {
            let mut map = self.in_flight.lock().expect("in-flight lock");
            map.retain(|_, (reply, _)| !reply.is_closed());
            map.values().map(|(_, at)| *at).min()
        };
        let Some(oldest) = oldest else { return Ok(()) };
        let waited = oldest.elapsed();
        if waited > LANE_SILENCE_MAX && self.heard.silent_for() >= waited {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the peer has answered nothing for {} ms", waited.as_millis()),
            ));
        }
        Ok(())
    }
}

/// Writes queued requests until the stream fails (the error) or the queue
/// closes.
async fn write_requests(
    mut write: WriteHalf<Stream>,
    queue: &mut mpsc::Receiver<Outgoing>,
    first: Outgoing,
    lane: Lane<'_>,
) -> io::Error {
    let (peer, in_flight) = (lane.peer, lane.in_flight);
    let mut next_id = 0u64;
    let mut buf = Vec::new();
    let mut item = Some(first);
    let mut check = tokio::time::interval(SILENCE_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = match item.take() {
            Some(o) => o,
            None => loop {
                tokio::select! {
                    o = queue.recv() => match o {
                        Some(o) => break o,
                        None => return io::Error::other("the transport stopped"),
                    },
                    _ = check.tick() => if let Err(e) = lane.check_alive() {
                        return e;
                    },
                }
            },
        };
        let mut next = Some(first);
        while let Some(o) = next {
            let now = Instant::now();
            // The caller has given up: it was told the request timed out, so
            // sending it now could only act on it unasked.
            if !o.reply.is_closed() && o.deadline > now {
                let mut map = in_flight.lock().expect("in-flight lock");
                if map.len() >= LANE_IN_FLIGHT_MAX {
                    map.retain(|_, (r, _)| !r.is_closed());
                }
                if map.len() >= LANE_IN_FLIGHT_MAX {
                    let why = format!("{LANE_IN_FLIGHT_MAX} requests already in flight on this lane");
                    let _ = o.reply.send(Err(SendError::Unreachable(peer, why)));
                } else {
                    next_id += 1;
                    map.insert(next_id, (o.reply, now));
                    push_frame(&mut buf, next_id, STATUS_OK, &o.payload);
                }
            }
            next = if buf.len() < LANE_WRITE_BYTES_MAX { queue.try_recv().ok() } else { None };
        }
        if buf.is_empty() {
            continue;
        }
        if let Err(e) = write_all(&mut write, &buf).await {
            return e;
        }
        buf.clear();
        buf.shrink_to(LANE_WRITE_BYTES_MAX);
        // A busy lane never waits in the select above, so it checks here,
        // as often as an idle one: not on every write.
        if check.tick().now_or_never().is_some()
            && let Err(e) = lane.check_alive()
        {
            return e;
        }
    }
}

/// Reads responses and hands each to its waiting request; returns why the
/// stream ended.
async fn read_responses(
    peer: PeerId,
    read: ReadHalf<Stream>,
    in_flight: Arc<InFlight>,
    heard: Arc<Heard>,
    message_bytes_max: usize,
) -> io::Error {
    let mut read = BufReader::with_capacity(READ_BUFFER_BYTES, read);
    loop {
        let (id, status, payload) = match read_frame(&mut read, message_bytes_max).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the lane"),
            Err(e) => return e,
        };
        heard.now();
        let Some((reply, _)) = in_flight.lock().expect("in-flight lock").remove(&id) else {
            continue; // its caller gave up and was swept
        };
        let answer = match status {
            STATUS_OK => hie_domain::codec::decode::<Response>(&payload)
                .map_err(|e| SendError::Failed(peer, format!("undecodable response: {e}"))),
            _ => Err(SendError::Failed(
                peer,
                format!("the peer refused the request: {}", String::from_utf8_lossy(&payload)),
            )),
        };
        let _ = reply.send(answer);
    }
}

/// Serves one peer's lane: handles its requests concurrently (at most
/// `concurrent_max` at once) and writes each response when it is ready.
async fn serve(
    peer: PeerId,
    stream: Stream,
    inbound: Arc<dyn Inbound>,
    counters: Arc<P2pCounters>,
    message_bytes_max: usize,
    concurrent_max: usize,
) {
    let (read, write) = stream.split();
    let mut read = BufReader::with_capacity(READ_BUFFER_BYTES, read);
    let (tx, rx) = mpsc::channel::<Vec<u8>>(concurrent_max.max(1));
    let mut writer = tokio::spawn(write_responses(write, rx));
    let permits = Arc::new(Semaphore::new(concurrent_max.max(1)));
    loop {
        // If answers can no longer be written, stop taking requests: the
        // lane closes and the peer opens another, rather than sending into
        // a lane that never answers.
        let got = tokio::select! {
            got = read_frame(&mut read, message_bytes_max) => got,
            _ = &mut writer => {
                tracing::info!(%peer, "closing a lane from the peer: its answers could not be written");
                return;
            }
        };
        let (id, payload) = match got {
            Ok(Some((id, STATUS_OK, payload))) => (id, payload),
            Ok(Some((0, STATUS_HELLO, _))) => {
                if tx.send(frame(0, STATUS_HELLO, &[])).await.is_err() {
                    break;
                }
                continue;
            }
            Ok(Some((_, status, _))) => {
                refuse(&counters, &peer, &format!("a request frame with status {status}"));
                break;
            }
            Ok(None) => break,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                refuse(&counters, &peer, &e.to_string());
                break;
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "lane from peer closed");
                break;
            }
        };
        counters.requests_received.fetch_add(1, Ordering::Relaxed);
        let request = match hie_domain::codec::decode::<Request>(&payload) {
            Ok(r) => r,
            Err(e) => {
                refuse(&counters, &peer, &e.to_string());
                let refusal = frame(id, STATUS_REFUSED, format!("undecodable request: {e}").as_bytes());
                if tx.send(refusal).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let Ok(permit) = permits.clone().acquire_owned().await else { break };
        let fut = inbound.handle(peer, request);
        let tx = tx.clone();
        tokio::spawn(async move {
            let response = hie_domain::codec::encode(&fut.await);
            let answer = if response.len() > message_bytes_max {
                let e = crate::codec::TooLarge { bytes: response.len(), max: message_bytes_max };
                frame(id, STATUS_REFUSED, e.to_string().as_bytes())
            } else {
                frame(id, STATUS_OK, &response)
            };
            let _ = tx.send(answer).await;
            drop(permit);
        });
    }
    // Responses still being worked out finish and are written; then the
    // writer ends with the last sender.
    drop(tx);
    let _ = writer.await;
}

fn refuse(counters: &P2pCounters, peer: &PeerId, why: &str) {
    counters.refused_messages.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(%peer, error = %why, "refused inbound message");
}

/// Writes response frames as they come, gathering those waiting into one
/// write.
async fn write_responses(mut write: WriteHalf<Stream>, mut frames: mpsc::Receiver<Vec<u8>>) {
    let mut buf = Vec::new();
    while let Some(first) = frames.recv().await {
        buf.extend_from_slice(&first);
        while buf.len() < LANE_WRITE_BYTES_MAX {
            match frames.try_recv() {
                Ok(f) => buf.extend_from_slice(&f),
                Err(_) => break,
            }
        }
        if write_all(&mut write, &buf).await.is_err() {
            return;
        }
        buf.clear();
        buf.shrink_to(LANE_WRITE_BYTES_MAX);
    }
    let _ = write.close().await;
}

async fn write_all<W: AsyncWrite + Unpin>(write: &mut W, buf: &[u8]) -> io::Result<()> {
    write.write_all(buf).await?;
    write.flush().await
}

pub(crate) fn frame(id: u64, status: u8, payload: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(HEADER_BYTES + payload.len());
    push_frame(&mut buf, id, status, payload);
    buf
}

fn push_frame(buf: &mut Vec<u8>, id: u64, status: u8, payload: &[u8]) {
    buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    buf.extend_from_slice(&id.to_be_bytes());
    buf.push(status);
    buf.extend_from_slice(payload);
}

/// The next frame, or `None` at a clean end of the stream (between frames).
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    read: &mut R,
    max: usize,
) -> io::Result<Option<(u64, u8, Vec<u8>)>> {
    let mut header = [0u8; HEADER_BYTES];
    let mut got = 0;
    while got < HEADER_BYTES {
        match read.read(&mut header[got..]).await? {
            0 if got == 0 => return Ok(None),
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    let len = u32::from_be_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes exceeds message_bytes_max {max}"),
        ));
    }
    let id = u64::from_be_bytes(header[4..12].try_into().expect("8 bytes"));
    let payload = crate::codec::read_payload(read, len).await?;
    Ok(Some((id, header[12], payload)))
}

#[cfg(test)]
mod tests {
    use futures::io::Cursor;

    use super::*;

    #[test]
    fn frames_round_trip_and_are_bounded() {
        futures::executor::block_on(async {
            let mut buf = Vec::new();
            push_frame(&mut buf, 7, STATUS_OK, b"hello");
            push_frame(&mut buf, 8, STATUS_REFUSED, b"");
            let mut r = Cursor::new(buf.clone());
            assert_eq!(read_frame(&mut r, 5).await.unwrap(), Some((7, STATUS_OK, b"hello".to_vec())));
            assert_eq!(read_frame(&mut r, 5).await.unwrap(), Some((8, STATUS_REFUSED, vec![])));
            // A clean end between frames.
            assert_eq!(read_frame(&mut r, 5).await.unwrap(), None);

            // A frame claiming more than the limit is refused before it is read.
            let err = read_frame(&mut Cursor::new(buf.clone()), 4).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert!(err.to_string().contains("exceeds message_bytes_max"), "{err}");

            // A frame cut short, in its header or its payload, is an error.
            for cut in [3, HEADER_BYTES + 2] {
                let err = read_frame(&mut Cursor::new(buf[..cut].to_vec()), 5).await.unwrap_err();
                assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "cut at {cut}");
            }
        });
    }
}
