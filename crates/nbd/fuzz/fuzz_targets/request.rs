//! Transmission requests on an already negotiated session. Byte 0 picks the session:
//! bit 0 structured replies (with every meta context), bit 1 read-only export, bit 2 no
//! meta contexts. Oracle (in `nbd::fuzzing::request`): no panic, the export is never
//! called out of bounds or written when read-only, and with structured replies the
//! output is a well-framed reply stream.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbd::fuzzing::request(data);
});
