//! Fuzz target: the MQTT envelope decoder must return a value or a typed error for any input, and whatever it
//! accepts must survive a re-encode/decode round trip.
//!
//! Not asserted: byte-identical re-encoding. postcard accepts over-long varints (found by this target), so the
//! encoding is not canonical; that is harmless because signatures and document digests cover the exact received
//! bytes, never a re-encoding.
#![no_main]

use flotilla_shared::codec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = codec::decode(data) {
        let again = codec::encode(&msg).expect("accepted messages re-encode within their caps");
        assert_eq!(codec::decode(&again), Ok(msg));
    }
});
