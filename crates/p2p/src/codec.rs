//! Length-prefixed CBOR messages, each bounded by a size limit.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use libp2p::request_response::Codec;

use crate::wire::{Request, Response};

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/hie/rpc/1");

#[derive(Debug, Clone)]
pub struct HieCodec {
    /// Largest message read or written, in bytes (prefix excluded).
    pub message_bytes_max: usize,
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
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, bytes: &[u8], max: usize) -> io::Result<()> {
    if bytes.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("message of {} bytes exceeds message_bytes_max {max}", bytes.len()),
        ));
    }
    io.write_all(&(bytes.len() as u32).to_be_bytes()).await?;
    io.write_all(bytes).await?;
    io.close().await
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    hie_domain::codec::decode(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

impl Codec for HieCodec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T: AsyncRead + Unpin + Send>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Request> {
        decode(&read_frame(io, self.message_bytes_max).await?)
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Response> {
        decode(&read_frame(io, self.message_bytes_max).await?)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(&mut self, _: &StreamProtocol, io: &mut T, req: Request) -> io::Result<()> {
        write_frame(io, &hie_domain::codec::encode(&req), self.message_bytes_max).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(&mut self, _: &StreamProtocol, io: &mut T, res: Response) -> io::Result<()> {
        write_frame(io, &hie_domain::codec::encode(&res), self.message_bytes_max).await
    }
}
