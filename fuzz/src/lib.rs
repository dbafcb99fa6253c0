//! What the fuzz targets share: a fixed minisign key pair made for fuzzing, so corpus
//! files that carry a signature keep verifying from one run to the next.
//!
//! Not for anything else: this key signs nothing real, and no install trusts it.

use changeover_protocol::package::VendorKey;

/// The fuzzing key's public half, as `release keygen` writes a `.pub` file.
pub const TEST_PUBLIC_KEY: &str = "untrusted comment: minisign public key: FBF78D43284DDAAC
RWSs2k0oQ433+63OH7EmNw+yPRGa3RJnJxLWtvUxzEqCARXf+zjVm9wb
";

/// The fuzzing key's secret half, unencrypted: published on purpose, it signs nothing real.
pub const TEST_SECRET_KEY: &str = "untrusted comment: changeover fuzzing key: signs nothing real
RWQAAEIyAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAArNpNKEON9/tz7oPSprUk/huRs61QkjpUermpqfv3lSFlEhe+JFmGoK3OH7EmNw+yPRGa3RJnJxLWtvUxzEqCARXf+zjVm9wbyCM9gW6PlsepnKPGoNvji18JYR0Bkb1tTjJnr36oiWQ=
";

/// The vendor key a fuzz target verifies against.
pub fn vendor_key() -> &'static VendorKey {
    static KEY: std::sync::OnceLock<VendorKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| VendorKey::decode(TEST_PUBLIC_KEY).expect("the fuzzing key reads"))
}

/// Signs `bytes` with the fuzzing key, as `release pack` signs a manifest or a package.
pub fn sign(bytes: &[u8], trusted_comment: &str) -> String {
    static SECRET: std::sync::OnceLock<minisign::SecretKey> = std::sync::OnceLock::new();
    let secret = SECRET.get_or_init(|| {
        minisign::SecretKeyBox::from_string(TEST_SECRET_KEY)
            .and_then(|key| key.into_unencrypted_secret_key())
            .expect("the fuzzing key reads")
    });
    minisign::sign(None, secret, bytes, Some(trusted_comment), None)
        .expect("signs")
        .into_string()
}
