//! Length-prefixed CBOR messages, each bounded by a size limit.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use libp2p::request_response::Codec;

use crate::wire::{Request, Response};

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/hie/rpc/1");

#[derive(Debug, Clone)]
pub struct HieCodec {
    /// Largest message read or written, in bytes (prefix excluded).
    pub message_bytes_max: usize,
    /// Inbound requests refused as oversized, malformed or truncated.
    pub refused: Arc<AtomicU64>,
}

impl HieCodec {
    pub fn new(message_bytes_max: usize) -> Self {
        HieCodec { message_bytes_max, refused: Arc::new(AtomicU64::new(0)) }
    }
}

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes exceeds message_bytes_max {max}"),
        ));
    }
    read_payload(io, len).await
}

/// Most bytes set aside for a message before any of it has arrived. A
/// longer message's buffer grows as its bytes come, so a length prefix
/// alone (four bytes from a peer) cannot make this node allocate up to
/// `message_bytes_max` (found by `tests/fuzz` p2p_frames).
pub(crate) const PAYLOAD_PREALLOC_BYTES_MAX: usize = 64 << 10;

/// The `len` bytes of a message whose length prefix has been read.
pub(crate) async fn read_payload<T: AsyncRead + Unpin>(io: &mut T, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len.min(PAYLOAD_PREALLOC_BYTES_MAX));
    io.take(len as u64).read_to_end(&mut buf).await?;
    if buf.len() < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(buf)
}

/// A message this node would not send: larger than `message_bytes_max`.
/// Carried inside the `io::Error` of the failed send, so that the sender
/// can tell it apart (Raft then sends fewer entries at a time).
#[derive(Debug, thiserror::Error)]
#[error("message of {bytes} bytes exceeds message_bytes_max {max}")]
pub struct TooLarge {
    pub bytes: usize,
    pub max: usize,
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, bytes: &[u8], max: usize) -> io::Result<()> {
    if bytes.len() > max {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, TooLarge { bytes: bytes.len(), max }));
    }
    // One write, so one yamux frame: the length and the message together.
    let mut frame = Vec::with_capacity(4 + bytes.len());
    frame.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    frame.extend_from_slice(bytes);
    io.write_all(&frame).await?;
    io.close().await
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    hie_domain::codec::decode(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

impl Codec for HieCodec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Request> {
        let result = match read_frame(io, self.message_bytes_max).await {
            Ok(frame) => decode(&frame),
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            // libp2p drops a request that fails to read without an event, so
            // the refusal is counted and logged here.
            self.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "refused inbound message");
        }
        result
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Response> {
        decode(&read_frame(io, self.message_bytes_max).await?)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Request,
    ) -> io::Result<()> {
        write_frame(io, &hie_domain::codec::encode(&req), self.message_bytes_max).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Response,
    ) -> io::Result<()> {
        write_frame(io, &hie_domain::codec::encode(&res), self.message_bytes_max).await
    }
}

#[cfg(test)]
mod tests {
    use futures::io::Cursor;

    use super::*;

    fn codec(max: usize) -> HieCodec {
        HieCodec::new(max)
    }

    #[test]
    fn round_trip_and_limits() {
        futures::executor::block_on(async {
            let mut buf = Cursor::new(Vec::new());
            codec(1024).write_request(&PROTOCOL, &mut buf, Request::ReadIndex).await.unwrap();
            let bytes = buf.into_inner();
            let got = codec(1024).read_request(&PROTOCOL, &mut Cursor::new(bytes.clone())).await.unwrap();
            assert!(matches!(got, Request::ReadIndex));

            // A frame claiming more than the limit is refused before it is read.
            let mut huge = (u32::MAX).to_be_bytes().to_vec();
            huge.extend_from_slice(&[0; 8]);
            let err = codec(1024).read_request(&PROTOCOL, &mut Cursor::new(huge)).await.unwrap_err();
            assert!(err.to_string().contains("exceeds message_bytes_max"), "{err}");

            // Garbage inside a well-sized frame is refused as invalid data.
            let mut garbage = 4u32.to_be_bytes().to_vec();
            garbage.extend_from_slice(&[0xff, 0x00, 0x13, 0x37]);
            let err = codec(1024).read_request(&PROTOCOL, &mut Cursor::new(garbage)).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);

            // A truncated frame is an error, not a hang or a panic.
            let err = codec(1024)
                .read_request(&PROTOCOL, &mut Cursor::new(bytes[..bytes.len() - 1].to_vec()))
                .await
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);

            // The writer refuses to send an oversized message too.
            let err =
                codec(2).write_request(&PROTOCOL, &mut Cursor::new(Vec::new()), Request::ReadIndex).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        });
    }
}
