#![no_main]
//! Bytes from a peer, read as a lane (frames `[len u32][id u64][status u8]`
//! and a CBOR `Request` or `Response`) or, by the first byte, as a
//! request-response substream (`[len u32]` and CBOR). Never panics; no
//! length prefix makes it hold more heap than the input allows; a frame read
//! is the frame a writer sends for it; a message that decodes is sent as one
//! that decodes to the same, and is encoded the same way again.

mod common;

use hie_domain::codec;
use hie_p2p::fuzzing::{
    LaneFrames, lane_frame, rpc_read_request, rpc_read_response, rpc_write_request, rpc_write_response,
};
use hie_p2p::{Request, Response};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: common::PeakAlloc = common::PeakAlloc;

/// The node's default `p2p.message_bytes_max`.
const MESSAGE_BYTES_MAX: usize = 16 << 20;

fn request_round_trips(r: &Request) {
    let bytes = codec::encode(r);
    let again: Request = codec::decode(&bytes).expect("an encoded request decodes");
    assert_eq!(format!("{again:?}"), format!("{r:?}"));
    assert_eq!(codec::encode(&again), bytes, "encoding is deterministic");
}

fn response_round_trips(r: &Response) {
    let bytes = codec::encode(r);
    let again: Response = codec::decode(&bytes).expect("an encoded response decodes");
    assert_eq!(format!("{again:?}"), format!("{r:?}"));
    assert_eq!(codec::encode(&again), bytes, "encoding is deterministic");
}

fn lane(stream: &[u8]) {
    let mut frames = LaneFrames::new(stream, MESSAGE_BYTES_MAX);
    loop {
        let start = frames.position();
        let Ok(Some((id, status, payload))) = frames.next_frame() else { break };
        assert!(payload.len() <= MESSAGE_BYTES_MAX);
        assert_eq!(lane_frame(id, status, &payload), stream[start..frames.position()]);
        // `serve` reads a request, `read_responses` a response.
        if let Ok(r) = codec::decode::<Request>(&payload) {
            request_round_trips(&r);
        }
        if let Ok(r) = codec::decode::<Response>(&payload) {
            response_round_trips(&r);
        }
    }
}

fn rpc(stream: &[u8]) {
    if let Ok(r) = rpc_read_request(stream, MESSAGE_BYTES_MAX) {
        request_round_trips(&r);
        let seen = format!("{r:?}");
        // Inputs are far below the limit (`-max_len`), and an encoding is
        // never many times its input: what was read can be sent.
        let sent = rpc_write_request(r, MESSAGE_BYTES_MAX).expect("a request read is written");
        let back = rpc_read_request(&sent, MESSAGE_BYTES_MAX).expect("a written request is read");
        assert_eq!(format!("{back:?}"), seen);
    }
    if let Ok(r) = rpc_read_response(stream, MESSAGE_BYTES_MAX) {
        response_round_trips(&r);
        let seen = format!("{r:?}");
        let sent = rpc_write_response(r, MESSAGE_BYTES_MAX).expect("a response read is written");
        let back = rpc_read_response(&sent, MESSAGE_BYTES_MAX).expect("a written response is read");
        assert_eq!(format!("{back:?}"), seen);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else { return };
    common::bounded("p2p frames", data.len(), || if mode & 1 == 0 { lane(stream) } else { rpc(stream) });
});
