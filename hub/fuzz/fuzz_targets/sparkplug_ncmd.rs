//! Fuzz target: a Sparkplug B command as the hub receives it from a feed credential (`spBv1.0/{group}/NCMD/{node}`
//! and a protobuf payload, both chosen by the sender). Parsing the topic and the payload must never panic, and a
//! rebirth request may only ever produce a birth of a node that is alive in that group, on that group's topic.
#![no_main]

use flotilla_hub::telemetry::sparkplug::{Sparkplug, is_rebirth_request, parse_ncmd};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first line is the topic, the rest the payload.
    let (topic, payload) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(topic) = std::str::from_utf8(topic) else {
        return;
    };
    let asks = is_rebirth_request(payload);
    let Some((group, node)) = parse_ncmd(topic) else {
        return;
    };
    let mut sp = Sparkplug::default();
    sp.online("live", "eu-west", 1);
    if asks {
        for out in sp.rebirth(node, group, 10_000) {
            assert_eq!((node, group), ("live", "eu-west"));
            assert_eq!(out.topic, "spBv1.0/eu-west/NBIRTH/live");
        }
    }
});
