//! A release whose links add up to a way out, signed by the vendor key: `b -> .` is
//! harmless alone, and `a -> b/..` reads like `a -> .` as text but leads to the folder
//! above the install on disk. The first install and the changeover must both refuse it,
//! naming the link; the changeover in its preflight, before anyone is warned, with the old
//! release still serving.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use changeover_protocol::release::current_platform;
use changeover_tests::feeds::{StaticServer, Vendor, server_tree};
use changeover_tests::{ADMIN_PASSWORD, Server, binary, eventually, start_agent, status};
use serde_json::{Value, json};

/// The version the hostile release claims.
const HOSTILE_VERSION: &str = "1.2.0";

/// A vendor and a feed offering a real 1.0.0 and the hostile 1.2.0, built once for every
/// test in this file.
struct Fixture {
    _dir: tempfile::TempDir,
    vendor: Vendor,
    feed: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let vendor = Vendor::create(&dir.path().join("vendor"));
        let feed = dir.path().join("feed");
        let tree = server_tree(&dir.path().join("tree-1.0.0"), &[]);
        vendor.pack("server", "1.0.0", &tree, &feed);
        let entry = add_hostile_release(&vendor, &feed);
        offer_in_manifest(&vendor, &feed, entry);
        Fixture {
            _dir: dir,
            vendor,
            feed,
        }
    })
}

fn archive_name(version: &str) -> String {
    format!("server-{version}-{}.tar.gz", current_platform())
}

/// Writes the hostile archive into `feed` with a vendor signature, as a vendor's build
/// gone wrong (or a stolen key) would; the release tools refuse to pack it.
fn add_hostile_release(vendor: &Vendor, feed: &Path) -> Value {
    let mut builder = tar::Builder::new(Vec::new());
    let script = format!("#!/bin/sh\necho \"changeover-server {HOSTILE_VERSION} (stub)\"\n");
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(script.len() as u64);
    header.set_mode(0o755);
    builder
        .append_data(&mut header, "bin/changeover-server", script.as_bytes())
        .unwrap();
    for (path, target) in [("b", "."), ("a", "b/..")] {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        header.set_mode(0o777);
        header.set_link_name(target).unwrap();
        builder
            .append_data(&mut header, path, std::io::empty())
            .unwrap();
    }
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut encoder, &builder.into_inner().unwrap()).unwrap();
    let gz = encoder.finish().unwrap();

    let name = archive_name(HOSTILE_VERSION);
    let archive = feed.join(&name);
    std::fs::write(&archive, &gz).unwrap();
    use sha2::Digest as _;
    let entry = json!({
        "product": "changeover", "kind": "server", "version": HOSTILE_VERSION,
        "platform": current_platform(), "archive": name, "size": gz.len(),
        "sha256": hex::encode(sha2::Sha256::digest(&gz)), "notes": "links",
        "date": "2026-11-28T10:00:00Z"
    });
    vendor.sign_as_package(&archive, &entry);
    entry
}

/// Lists `entry` in the feed's manifest and signs the manifest again with the vendor key.
fn offer_in_manifest(vendor: &Vendor, feed: &Path, entry: Value) {
    let manifest_path = feed.join("manifest.json");
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    manifest["releases"].as_array_mut().unwrap().push(entry);
    std::fs::write(
        &manifest_path,
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
    // The manifest's trusted comment is not read; any text will do.
    vendor.sign_as_package(&manifest_path, &json!("changeover feed manifest"));
}

fn install(root: &Path, package: &Path) -> std::process::Output {
    Command::new(binary("changeover-server"))
        .args(["install", "--root"])
        .arg(root)
        .arg("--package")
        .arg(package)
        .arg("--public-key")
        .arg(&fixture().vendor.public_key)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// What the refusal must say: the entry and the link target it was refused for.
fn assert_names_the_link(message: &str) {
    assert!(
        message.contains("\"a\"") && message.contains("\"b/..\"") && message.contains("\"..\""),
        "the refusal does not name the link a -> b/..: {message}"
    );
}

/// Everything under `dir`, as paths relative to it, links not followed.
fn walk(dir: &Path) -> Vec<String> {
    fn visit(base: &Path, dir: &Path, found: &mut Vec<String>) {
        let Ok(listing) = std::fs::read_dir(dir) else {
            return;
        };
        for item in listing.flatten() {
            let path = item.path();
            found.push(path.strip_prefix(base).unwrap().display().to_string());
            if item.file_type().is_ok_and(|kind| kind.is_dir()) {
                visit(base, &path, found);
            }
        }
    }
    let mut found = Vec::new();
    visit(dir, dir, &mut found);
    found.sort();
    found
}

#[test]
fn install_refuses_the_link_chain_and_leaves_nothing() {
    let fixture = fixture();
    let site = tempfile::tempdir().unwrap();
    let root = site.path().join("office");
    let output = install(&root, &fixture.feed.join(archive_name(HOSTILE_VERSION)));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "installed: {stderr}");
    assert!(stderr.contains("is refused"), "{stderr}");
    assert_names_the_link(&stderr);
    let left = walk(site.path());
    assert!(
        left.iter().all(|path| !path.contains("server")),
        "an install or its staging was left behind: {left:?}"
    );
}

#[test]
fn the_changeover_refuses_the_link_chain_in_its_preflight_and_disturbs_nobody() {
    let fixture = fixture();
    let site = tempfile::tempdir().unwrap();
    let root = site.path().join("office");
    let output = install(&root, &fixture.feed.join(archive_name("1.0.0")));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let feed_server = StaticServer::python(&fixture.feed, site.path());
    let config = format!(
        "[server]\nheartbeat_secs = 1\n[feed]\nurl = \"{}\"\n",
        feed_server.url()
    );
    let server = Server::start_installed(&root, &config);
    let hook_log = site.path().join("dora-hooks.log");
    let warn = format!(
        "echo \"warning $CHANGEOVER_TARGET_VERSION\" >> {}",
        hook_log.display()
    );
    let logout = format!(
        "echo \"logout $CHANGEOVER_TARGET_VERSION\" >> {}",
        hook_log.display()
    );
    let _agent = start_agent(
        &server.url(),
        "dora",
        &site.path().join("dora"),
        &["--warn-hook", &warn, "--logout-hook", &logout],
    );
    eventually(Duration::from_secs(20), "dora connected", || {
        (status(&server.url())["sessions"].as_array()?.len() == 1).then_some(())
    });
    // The feed offers it: a download and its verification let it through to the preflight.
    eventually(Duration::from_secs(20), "the feed offering 1.2.0", || {
        (status(&server.url())["available_version"] == HOSTILE_VERSION).then_some(())
    });

    let output = Command::new(binary("changeover-agent"))
        .args(["admin", "update", "--server", &server.url(), "--json"])
        .args(["--grace", "2", "--version", HOSTILE_VERSION])
        .env("CHANGEOVER_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "the update went through: {stderr}"
    );
    assert_names_the_link(&stderr);

    let report = status(&server.url());
    let last = &report["last_changeover"];
    assert_eq!(last["outcome"], "failed", "{report}");
    assert_eq!(last["phase"], "preparing", "{report}");
    assert_names_the_link(last["reason"].as_str().unwrap_or_default());
    assert_eq!(report["server_version"], "1.0.0", "{report}");
    assert_eq!(
        report["sessions"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    assert!(!hook_log.exists(), "somebody was warned or logged out");
    // Neither the staging folder nor the link is left anywhere in the product folder.
    let left = walk(&root);
    assert!(
        left.iter()
            .all(|path| !path.starts_with(".server.staging") && !path.ends_with("/a")),
        "{left:?}"
    );
    let info: Value =
        serde_json::from_slice(&std::fs::read(root.join("server/release.json")).unwrap()).unwrap();
    assert_eq!(info["version"], "1.0.0");
}
