//! The README's first command: the whole changeover with nothing set up, the vendor's
//! application (the demo's order book) carried with its data.

use std::process::{Command, Stdio};

use changeover_tests::binary;

#[test]
fn the_demo_ends_on_the_new_version_with_the_applications_orders_kept() {
    let output = Command::new(binary("changeover-server"))
        .args(["demo", "--agents", "2", "--grace", "1"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for line in [
        "application \"business\" 1.0.0 (run by the server) took 3 orders",
        "application data    3 of 3 orders kept, served by business 1.1.0",
        "carried files       intact",
        "changeover          committed",
        "result              OK",
    ] {
        assert!(stdout.contains(line), "{line:?} missing:\n{stdout}");
    }
}
