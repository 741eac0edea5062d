//! Entry points for the fuzz targets (`tests/fuzz/`): the decoders a peer's
//! bytes reach, driven from a byte slice without a network. Not an API.

use std::io;

use futures::io::Cursor;
use libp2p::request_response::Codec;

use crate::codec::{HieCodec, PROTOCOL};
use crate::wire::{Request, Response};

/// The frames of a lane, read as both ends of a lane read them.
pub struct LaneFrames<'a> {
    read: Cursor<&'a [u8]>,
    message_bytes_max: usize,
}

impl<'a> LaneFrames<'a> {
    pub fn new(bytes: &'a [u8], message_bytes_max: usize) -> LaneFrames<'a> {
        LaneFrames { read: Cursor::new(bytes), message_bytes_max }
    }

    /// The next frame `(id, status, payload)`, `None` at a clean end.
    pub fn next_frame(&mut self) -> io::Result<Option<(u64, u8, Vec<u8>)>> {
        futures::executor::block_on(crate::lane::read_frame(&mut self.read, self.message_bytes_max))
    }

    /// Bytes read so far.
    pub fn position(&self) -> usize {
        self.read.position() as usize
    }
}

/// A lane frame as the writers build it.
pub fn lane_frame(id: u64, status: u8, payload: &[u8]) -> Vec<u8> {
    crate::lane::frame(id, status, payload)
}

/// A request-response substream read as an inbound request.
pub fn rpc_read_request(bytes: &[u8], message_bytes_max: usize) -> io::Result<Request> {
    futures::executor::block_on(HieCodec::new(message_bytes_max).read_request(&PROTOCOL, &mut Cursor::new(bytes)))
}

/// A request-response substream read as a response.
pub fn rpc_read_response(bytes: &[u8], message_bytes_max: usize) -> io::Result<Response> {
    futures::executor::block_on(HieCodec::new(message_bytes_max).read_response(&PROTOCOL, &mut Cursor::new(bytes)))
}

/// What writing `request` on a request-response substream sends.
pub fn rpc_write_request(request: Request, message_bytes_max: usize) -> io::Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    futures::executor::block_on(HieCodec::new(message_bytes_max).write_request(&PROTOCOL, &mut out, request))?;
    Ok(out.into_inner())
}

/// What writing `response` on a request-response substream sends.
pub fn rpc_write_response(response: Response, message_bytes_max: usize) -> io::Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    futures::executor::block_on(HieCodec::new(message_bytes_max).write_response(&PROTOCOL, &mut out, response))?;
    Ok(out.into_inner())
}
