//! Runs the fuzz harnesses (`nbd::fuzzing`, shared with `fuzz/`) over a few thousand
//! deterministic random and mutated inputs, so CI exercises them without cargo-fuzz.

use nbd::fuzzing;
use nbd::proto::{self, Request};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn req(command: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Request {
    Request {
        magic: proto::REQUEST_MAGIC,
        flags,
        command,
        cookie,
        offset,
        length,
    }
}

/// Valid request streams to mutate.
fn request_seeds() -> Vec<Vec<u8>> {
    let size = fuzzing::EXPORT_SIZE as u64;
    let reqs = vec![
        req(proto::CMD_READ, 0, 1, 0, 4096),
        req(proto::CMD_WRITE, proto::CMD_FLAG_FUA, 2, 8192, 16),
        req(proto::CMD_BLOCK_STATUS, 0, 3, 0, size as u32),
        req(
            proto::CMD_BLOCK_STATUS,
            proto::CMD_FLAG_REQ_ONE,
            4,
            size / 2,
            4096,
        ),
        req(proto::CMD_WRITE_ZEROES, proto::CMD_FLAG_NO_HOLE, 5, 0, 4096),
        req(proto::CMD_TRIM, 0, 6, 4097, 100),
        req(proto::CMD_FLUSH, 0, 7, 0, 0),
        req(proto::CMD_CACHE, 0, 8, 0, 512),
        req(proto::CMD_READ, proto::CMD_FLAG_DF, 9, size - 1, 1),
    ];
    let mut stream = Vec::new();
    for r in &reqs {
        stream.extend_from_slice(&r.encode());
        if r.command == proto::CMD_WRITE {
            stream.extend_from_slice(&[0xab; 16]);
        }
    }
    let mut disc = stream.clone();
    disc.extend_from_slice(&req(proto::CMD_DISC, 0, 10, 0, 0).encode());
    vec![stream, disc]
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(6) {
        match rng.below(5) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = [0, 0xff, 0x7f, 0x80, 1][rng.below(5)];
            }
            2 => {
                let i = rng.below(v.len() + 1);
                let n = 1 + rng.below(8);
                let extra = rng.bytes(n);
                v.splice(i..i, extra);
            }
            3 if !v.is_empty() => {
                v.truncate(rng.below(v.len()));
            }
            _ if !v.is_empty() => {
                // Overwrite a big-endian u32 somewhere with an edge value.
                let i = rng.below(v.len());
                let val = [0u32, 1, 0x7fff_ffff, u32::MAX, 32 << 20, (32 << 20) + 1][rng.below(6)];
                for (k, b) in val.to_be_bytes().iter().enumerate() {
                    if let Some(x) = v.get_mut(i + k) {
                        *x = *b;
                    }
                }
            }
            _ => v.extend(rng.bytes(4)),
        }
    }
    v
}

#[test]
fn handshake_harness_survives_random_and_mutated_inputs() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let seeds = [
        fuzzing::valid_session(&[], &[]),
        fuzzing::valid_session(
            &[
                req(proto::CMD_READ, 0, 1, 0, 512),
                req(proto::CMD_BLOCK_STATUS, 0, 2, 0, 65536),
                req(proto::CMD_DISC, 0, 3, 0, 0),
            ],
            &[],
        ),
    ];
    let mut runs = 0;
    for s in &seeds {
        fuzzing::handshake(s);
        runs += 1;
    }
    for _ in 0..3000 {
        let input = if rng.below(4) == 0 {
            let n = rng.below(300);
            let mut v = 3u32.to_be_bytes().to_vec();
            v.extend(rng.bytes(n));
            v
        } else {
            let seed = &seeds[rng.below(seeds.len())];
            mutate(&mut rng, seed)
        };
        fuzzing::handshake(&input);
        runs += 1;
    }
    assert_eq!(runs, 3002);
}

#[test]
fn request_harness_survives_random_and_mutated_inputs() {
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let seeds = request_seeds();
    for mode in 0..8u8 {
        for s in &seeds {
            let mut input = vec![mode];
            input.extend_from_slice(s);
            fuzzing::request(&input);
        }
    }
    for _ in 0..3000 {
        let mut input = vec![rng.next() as u8];
        if rng.below(4) == 0 {
            let n = rng.below(200);
            input.extend(rng.bytes(n));
        } else {
            let seed = &seeds[rng.below(seeds.len())];
            input.extend(mutate(&mut rng, seed));
        }
        fuzzing::request(&input);
    }
}

/// The harness oracle is not a no-op: a well-formed structured stream is accepted and a
/// broken one would be caught (the checker panics on bad framing).
#[test]
fn request_harness_checks_reply_framing() {
    let mut input = vec![1u8];
    input.extend_from_slice(&request_seeds()[1]);
    fuzzing::request(&input);
    let outcome = std::panic::catch_unwind(fuzzing::request_output_check_self_test);
    assert!(outcome.is_err(), "the reply checker must reject garbage");
}
