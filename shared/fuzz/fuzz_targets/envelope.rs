//! Fuzz target: the MQTT envelope decoder must return a value or a typed error for any input, and re-encode
//! whatever it accepts to the same bytes.
#![no_main]

use flotilla_shared::codec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = codec::decode(data) {
        // Canonical encoding: anything accepted re-encodes to exactly the input.
        let again = codec::encode(&msg).expect("accepted messages re-encode");
        assert_eq!(again, data);
    }
});
