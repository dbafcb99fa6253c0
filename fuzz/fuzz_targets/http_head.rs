//! The front door's request parser (`handshake::parse_head`) on whatever bytes arrive
//! first on a connection: never a panic, and a complete head is never longer than the
//! bytes it was read from.

#![no_main]

use changeover_server::handshake::parse_head;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((request, head_len))) = parse_head(data) {
        assert!(head_len <= data.len());
        let _ = (request.method(), request.uri(), request.headers().len());
    }
});
