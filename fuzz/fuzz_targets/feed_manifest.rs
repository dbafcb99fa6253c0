//! The feed manifest behind its signature (`package::verify_manifest`), against the fixed
//! fuzzing key. Two kinds of input:
//!
//! - `#` then manifest bytes: signed here with the fuzzing key first, so the fuzzer
//!   reaches the manifest's parsing and checks behind the signature;
//! - otherwise signature text, a NUL byte, manifest bytes: both as a hostile feed could
//!   serve them, so the signature's parsing and verification are searched too.
//!
//! Never a panic; a manifest that verifies has only valid entries, and one byte more
//! after signing is refused.

#![no_main]

use changeover_fuzz::{sign, vendor_key};
use changeover_protocol::package::verify_manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (signature, manifest) = match data.split_first() {
        Some((b'#', manifest)) => (sign(manifest, "changeover feed manifest"), manifest),
        _ => {
            let split = data
                .iter()
                .position(|&byte| byte == 0)
                .unwrap_or(data.len());
            let Ok(signature) = std::str::from_utf8(&data[..split]) else {
                return;
            };
            (
                signature.to_owned(),
                data.get(split + 1..).unwrap_or_default(),
            )
        }
    };
    if let Ok(parsed) = verify_manifest(manifest, &signature, vendor_key()) {
        for entry in &parsed.releases {
            assert!(entry.validate().is_ok(), "an invalid entry was accepted");
        }
        let mut altered = manifest.to_vec();
        altered.push(b'\n');
        assert!(verify_manifest(&altered, &signature, vendor_key()).is_err());
    }
});
