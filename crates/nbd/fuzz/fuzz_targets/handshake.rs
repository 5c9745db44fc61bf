//! The whole client byte stream, from the client flags on: option haggling (every
//! option, malformed lengths, huge payloads) and, after GO/EXPORT_NAME, transmission.
//! Oracle (in `nbd::fuzzing::handshake`): no panic; the server's output starts with the
//! greeting and its option replies are well framed; no export lease leaks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbd::fuzzing::handshake(data);
});
