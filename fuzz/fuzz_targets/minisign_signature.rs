//! The minisign signature parser (a `.minisig` file's text): `minisign_verify`'s own
//! decoder, the package signature on top of it (its trusted comment is the package's
//! entry) and the public key parser. Never a panic; a signature that reads can verify a
//! stream of bytes without one either.

#![no_main]

use changeover_fuzz::vendor_key;
use changeover_protocol::package::{PackageSignature, VendorKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = minisign_verify::Signature::decode(&text);
    let _ = VendorKey::decode(&text);
    if let Ok(signature) = PackageSignature::decode(&text, "a fuzzed package") {
        assert!(signature.claimed_entry().validate().is_ok());
        if let Ok(mut verifier) = signature.verifier(vendor_key(), "a fuzzed package") {
            let _ = verifier.update(data);
            let _ = verifier.finish();
        }
    }
});
