//! Releases end to end: packed with the real tools, served by stock static web servers,
//! downloaded and verified by the real server, refused for every reason that matters.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use changeover_protocol::package::{self, VendorKey};
use changeover_protocol::release::current_platform;
use changeover_tests::feeds::{StaticServer, Vendor, server_tree, stub_server_tree};
use changeover_tests::{ADMIN_PASSWORD, Server, admin, binary, eventually, status};
use serde_json::{Value, json};

/// A vendor, a feed folder with some server releases, and a product folder with one of
/// them installed.
struct Site {
    dir: tempfile::TempDir,
    vendor: Vendor,
    feed: PathBuf,
    root: PathBuf,
}

impl Site {
    fn new(versions: &[&str], installed: &str) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let vendor = Vendor::create(&dir.path().join("vendor"));
        let feed = dir.path().join("feed");
        for version in versions {
            let defaults = format!("release = \"{version}\"\n");
            let tree_dir = dir.path().join(format!("tree-{version}"));
            // Only the installed release runs here; the others need not hold a real binary.
            let tree = if *version == installed {
                server_tree(&tree_dir, &[("config/defaults.toml", defaults.as_bytes())])
            } else {
                stub_server_tree(
                    &tree_dir,
                    version,
                    &[("config/defaults.toml", defaults.as_bytes())],
                )
            };
            vendor.pack("server", version, &tree, &feed);
        }
        let root = dir.path().join("office");
        let output = install(
            &root,
            &feed.join(archive_name(installed)),
            &vendor.public_key,
        );
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        Site {
            dir,
            vendor,
            feed,
            root,
        }
    }

    fn archive(&self, version: &str) -> PathBuf {
        self.feed.join(archive_name(version))
    }

    fn start_server(&self, feed_url: Option<&str>) -> Server {
        let config = match feed_url {
            Some(url) => format!("[server]\nheartbeat_secs = 1\n[feed]\nurl = \"{url}\"\n"),
            None => "[server]\nheartbeat_secs = 1\n".to_owned(),
        };
        Server::start_installed(&self.root, &config)
    }

    fn downloads(&self) -> Vec<String> {
        list(&self.root.join("state/downloads"))
    }
}

fn archive_name(version: &str) -> String {
    format!("server-{version}-{}.tar.gz", current_platform())
}

fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|listing| {
            listing
                .flatten()
                .map(|item| item.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn install(root: &Path, package: &Path, public_key: &Path) -> std::process::Output {
    Command::new(binary("changeover-server"))
        .args(["install", "--root"])
        .arg(root)
        .arg("--package")
        .arg(package)
        .arg("--public-key")
        .arg(public_key)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn download(server: &Server, extra: &[&str]) -> (bool, Vec<Value>, String) {
    let url = server.url();
    let mut args = vec!["download", "--server", url.as_str(), "--json"];
    args.extend_from_slice(extra);
    let output = admin(&args, ADMIN_PASSWORD);
    let messages = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    (
        output.status.success(),
        messages,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn flip_byte_in_the_middle(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn a_release_round_trips_through_a_stock_static_server() {
    let site = Site::new(&["1.0.0", "1.1.0"], "1.0.0");
    let http = StaticServer::python(&site.feed, site.dir.path());
    let server = site.start_server(Some(&http.url()));
    let url = server.url();

    let report = status(&url);
    assert_eq!(report["server_version"], "1.0.0");
    assert_eq!(report["available_version"], "1.1.0");
    assert_eq!(report["feed"]["newest_version"], "1.1.0");
    assert_eq!(report["feed"]["error"], Value::Null);

    let (ok, messages, stderr) = download(&server, &[]);
    assert!(ok, "{stderr}");
    let types: Vec<&str> = messages.iter().filter_map(|m| m["type"].as_str()).collect();
    assert!(types.contains(&"download_accepted"), "{types:?}");
    assert!(types.contains(&"download_started"), "{types:?}");
    assert_eq!(types.last(), Some(&"package_ready"), "{types:?}");
    assert_eq!(messages.last().unwrap()["version"], "1.1.0");

    // The package in the downloads folder verifies on its own and unpacks to the tree.
    let downloaded = site
        .root
        .join("state/downloads")
        .join(archive_name("1.1.0"));
    let key = VendorKey::from_file(&site.vendor.public_key).unwrap();
    let entry = package::verify_archive(&downloaded, &key).unwrap();
    assert_eq!(entry.version.to_string(), "1.1.0");
    let unpacked = site.dir.path().join("unpacked");
    package::unpack(&downloaded, &unpacked).unwrap();
    assert_eq!(
        std::fs::read(unpacked.join("bin/changeover-server")).unwrap(),
        std::fs::read(site.dir.path().join("tree-1.1.0/bin/changeover-server")).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(unpacked.join("config/defaults.toml")).unwrap(),
        "release = \"1.1.0\"\n"
    );
    let report = status(&url);
    assert_eq!(report["candidate"]["version"], "1.1.0");
    assert_eq!(report["candidate"]["state"], "ready");
    assert_eq!(report["candidate"]["source"], "feed");

    // Asking again does not fetch it again.
    let (ok, messages, _) = download(&server, &[]);
    assert!(ok);
    assert!(
        !messages.iter().any(|m| m["type"] == "download_started"),
        "{messages:?}"
    );
}

/// Runs a download that must be refused; checks the reason and that nothing was kept.
fn assert_download_refused(site: &Site, server: &Server, extra: &[&str], reason: &str) {
    let (ok, messages, stderr) = download(server, extra);
    assert!(!ok, "accepted: {messages:?}");
    assert!(stderr.contains(reason), "expected {reason:?} in: {stderr}");
    let kept: Vec<String> = site
        .downloads()
        .into_iter()
        .filter(|name| name.contains("1.1.0"))
        .collect();
    assert!(kept.is_empty(), "a refused download left {kept:?}");
}

#[test]
fn a_tampered_manifest_is_refused() {
    let site = Site::new(&["1.0.0", "1.1.0"], "1.0.0");
    let manifest = site.feed.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replace("release 1.1.0", "release 1.1.0, trust me"),
    )
    .unwrap();
    let http = StaticServer::python(&site.feed, site.dir.path());
    let server = site.start_server(Some(&http.url()));
    assert_download_refused(&site, &server, &[], "feed manifest does not verify");
    let report = status(&server.url());
    assert!(
        report["feed"]["error"]
            .as_str()
            .unwrap()
            .contains("does not verify"),
        "{report}"
    );
    assert_eq!(report["available_version"], Value::Null);
}

#[test]
fn an_archive_altered_after_signing_is_refused_and_deleted() {
    let site = Site::new(&["1.0.0", "1.1.0"], "1.0.0");
    flip_byte_in_the_middle(&site.archive("1.1.0"));
    let http = StaticServer::python(&site.feed, site.dir.path());
    let server = site.start_server(Some(&http.url()));
    // A download is hashed once, for its signature, which binds every byte.
    assert_download_refused(
        &site,
        &server,
        &[],
        "does not verify with the vendor key: the file was altered",
    );
    let report = status(&server.url());
    assert!(
        report["last_refusal"]
            .as_str()
            .unwrap()
            .contains("the file was altered"),
        "{report}"
    );
    assert_eq!(report["candidate"], Value::Null);
}

#[test]
fn an_archive_larger_than_signed_is_cut_off_and_deleted() {
    let site = Site::new(&["1.0.0", "1.1.0"], "1.0.0");
    let archive = site.archive("1.1.0");
    let mut bytes = std::fs::read(&archive).unwrap();
    bytes.extend_from_slice(&[0u8; 4096]);
    std::fs::write(&archive, bytes).unwrap();
    let http = StaticServer::python(&site.feed, site.dir.path());
    let server = site.start_server(Some(&http.url()));
    assert_download_refused(&site, &server, &[], "bytes but the signed release is");
}

#[test]
fn a_truncated_archive_on_the_feed_is_refused_at_once_not_retried() {
    let site = Site::new(&["1.0.0", "1.1.0"], "1.0.0");
    let archive = site.archive("1.1.0");
    let bytes = std::fs::read(&archive).unwrap();
    std::fs::write(&archive, &bytes[..bytes.len() / 2]).unwrap();
    let http = StaticServer::python(&site.feed, site.dir.path());
    let server = site.start_server(Some(&http.url()));
    let (ok, messages, stderr) = download(&server, &[]);
    assert!(!ok, "accepted: {messages:?}");
    assert!(stderr.contains("truncated"), "{stderr}");
    let retries: Vec<&Value> = messages
        .iter()
        .filter(|message| message.to_string().contains("retry"))
        .collect();
    assert!(retries.is_empty(), "retried: {retries:?}");
    let leftovers: Vec<String> = walk(&site.root.join("state"))
        .into_iter()
        .filter(|name| name.contains("1.1.0"))
        .collect();
    assert!(leftovers.is_empty(), "kept: {leftovers:?}");
}

fn walk(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path.display().to_string());
        }
    }
    found
}

#[test]
fn a_feed_signed_with_another_key_is_refused() {
    let site = Site::new(&["1.0.0", "1.1.0"], "1.0.0");
    let impostor = Vendor::create(&site.dir.path().join("impostor"));
    std::fs::copy(
        &impostor.public_key,
        site.root.join("server/config/vendor.pub"),
    )
    .unwrap();
    let http = StaticServer::python(&site.feed, site.dir.path());
    let server = site.start_server(Some(&http.url()));
    assert_download_refused(
        &site,
        &server,
        &[],
        "another key than the configured vendor key",
    );
}

#[test]
fn an_older_release_is_refused_unless_the_admin_allows_a_downgrade() {
    let site = Site::new(&["1.0.0", "1.1.0"], "1.1.0");
    let http = StaticServer::python(&site.feed, site.dir.path());
    let server = site.start_server(Some(&http.url()));
    let report = status(&server.url());
    assert_eq!(report["server_version"], "1.1.0");
    assert_eq!(report["available_version"], Value::Null);

    let (ok, _, stderr) = download(&server, &["--version", "1.0.0"]);
    assert!(!ok);
    assert!(
        stderr.contains("not newer than the installed 1.1.0"),
        "{stderr}"
    );
    let (ok, _, stderr) = download(&server, &["--version", "1.1.0"]);
    assert!(!ok, "the installed version itself is no update");
    assert!(stderr.contains("not newer"), "{stderr}");
    let (ok, _, stderr) = download(&server, &["--version", "9.9.9"]);
    assert!(!ok);
    assert!(stderr.contains("no server 9.9.9"), "{stderr}");

    let (ok, messages, stderr) = download(&server, &["--version", "1.0.0", "--allow-downgrade"]);
    assert!(ok, "{stderr}");
    assert_eq!(messages.last().unwrap()["type"], "package_ready");
    // Fetched on purpose, it is what a changeover would install.
    assert_eq!(status(&server.url())["candidate"]["version"], "1.0.0");
}

#[test]
fn a_download_cut_half_way_resumes_where_it_stopped() {
    // About 6 MB that do not compress, served at 1 MB/s, so the transfer can be cut.
    let dir = tempfile::tempdir().unwrap();
    let vendor = Vendor::create(&dir.path().join("vendor"));
    let feed = dir.path().join("feed");
    let noise = random_bytes(6 * 1024 * 1024);
    let old = server_tree(&dir.path().join("old"), &[]);
    let new = stub_server_tree(
        &dir.path().join("new"),
        "2.0.0",
        &[("data/blob.bin", &noise)],
    );
    vendor.pack("server", "1.0.0", &old, &feed);
    vendor.pack("server", "2.0.0", &new, &feed);
    let root = dir.path().join("office");
    assert!(
        install(&root, &feed.join(archive_name("1.0.0")), &vendor.public_key)
            .status
            .success()
    );
    let mut nginx = StaticServer::nginx(&feed, &dir.path().join("nginx"), Some("1m"));
    let server = Server::start_installed(
        &root,
        &format!(
            "[server]\nheartbeat_secs = 1\n[feed]\nurl = \"{}\"\n",
            nginx.url()
        ),
    );

    let url = server.url();
    let follower = Command::new(binary("changeover-agent"))
        .args(["admin", "download", "--server", &url, "--json"])
        .env("CHANGEOVER_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let part = root
        .join("state/downloads")
        .join(format!("{}.part", archive_name("2.0.0")));
    eventually(
        Duration::from_secs(20),
        "a part of the archive on disk",
        || {
            let size = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
            (size > 1024 * 1024).then_some(())
        },
    );
    nginx.kill();
    let cut_at = std::fs::metadata(&part).unwrap().len();
    std::thread::sleep(Duration::from_millis(1500));
    nginx.start_again();

    let output = follower.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let messages: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert!(
        messages.iter().any(|m| m["type"] == "download_retrying"),
        "{messages:?}"
    );
    let resumed = messages
        .iter()
        .filter(|m| m["type"] == "download_started")
        .filter_map(|m| m["resumed_from"].as_u64())
        .max()
        .unwrap();
    assert!(
        resumed > 0 && resumed >= cut_at / 2,
        "resumed from {resumed}, cut at {cut_at}"
    );
    assert_eq!(messages.last().unwrap()["type"], "package_ready");
    let access_log = std::fs::read_to_string(dir.path().join("nginx/access.log")).unwrap();
    assert!(
        access_log.contains("\" 206 "),
        "nginx served a range: {access_log}"
    );
    let key = VendorKey::from_file(&vendor.public_key).unwrap();
    let downloaded = root.join("state/downloads").join(archive_name("2.0.0"));
    assert!(package::verify_archive(&downloaded, &key).is_ok());
    assert!(!part.exists());
}

#[test]
fn a_host_without_range_support_still_works_from_the_start() {
    let site = Site::new(&["1.0.0", "1.1.0"], "1.0.0");
    // What a broken earlier download left behind.
    let downloads = site.root.join("state/downloads");
    let archive = std::fs::read(site.archive("1.1.0")).unwrap();
    std::fs::write(
        downloads.join(format!("{}.part", archive_name("1.1.0"))),
        &archive[..archive.len() / 3],
    )
    .unwrap();
    let http = StaticServer::python(&site.feed, site.dir.path());
    let server = site.start_server(Some(&http.url()));
    let (ok, messages, stderr) = download(&server, &[]);
    assert!(ok, "{stderr}");
    let started: Vec<u64> = messages
        .iter()
        .filter(|m| m["type"] == "download_started")
        .filter_map(|m| m["resumed_from"].as_u64())
        .collect();
    assert_eq!(
        started,
        [0],
        "python's http.server ignores Range: {messages:?}"
    );
    assert_eq!(
        site.downloads(),
        [
            archive_name("1.1.0"),
            format!("{}.minisig", archive_name("1.1.0"))
        ]
    );
}

#[test]
fn the_inbox_takes_a_good_package_within_a_second_and_rejects_a_tampered_one() {
    let site = Site::new(&["1.0.0", "1.1.0", "1.2.0"], "1.0.0");
    let server = site.start_server(None);
    let url = server.url();
    let inbox = site.root.join("state/inbox");

    let name = archive_name("1.1.0");
    std::fs::copy(
        site.feed.join(format!("{name}.minisig")),
        inbox.join(format!("{name}.minisig")),
    )
    .unwrap();
    std::fs::copy(site.archive("1.1.0"), inbox.join(&name)).unwrap();
    let dropped = Instant::now();
    let report = eventually(
        Duration::from_secs(10),
        "the package taken from the inbox",
        || {
            let report = status(&url);
            (report["candidate"]["version"] == "1.1.0").then_some(report)
        },
    );
    let taken_after = dropped.elapsed();
    assert!(taken_after < Duration::from_secs(3), "took {taken_after:?}");
    assert_eq!(report["candidate"]["source"], "inbox");
    assert_eq!(report["available_version"], "1.1.0");
    assert!(
        list(&inbox).iter().all(|n| !n.contains("1.1.0")),
        "{:?}",
        list(&inbox)
    );

    let bad = archive_name("1.2.0");
    let tampered = site.dir.path().join(&bad);
    std::fs::copy(site.archive("1.2.0"), &tampered).unwrap();
    flip_byte_in_the_middle(&tampered);
    std::fs::copy(
        site.feed.join(format!("{bad}.minisig")),
        inbox.join(format!("{bad}.minisig")),
    )
    .unwrap();
    std::fs::rename(&tampered, inbox.join(&bad)).unwrap();
    let reason_file = inbox.join("rejected").join(format!("{bad}.reason.txt"));
    eventually(
        Duration::from_secs(10),
        "the tampered package moved aside",
        || reason_file.exists().then_some(()),
    );
    let reason = std::fs::read_to_string(&reason_file).unwrap();
    assert!(reason.contains("SHA-256"), "{reason}");
    assert!(inbox.join("rejected").join(&bad).exists());
    assert!(!inbox.join(&bad).exists());
    let report = status(&url);
    assert_eq!(
        report["candidate"]["version"], "1.1.0",
        "the tampered one is no candidate"
    );
    assert!(
        report["last_refusal"].as_str().unwrap().contains(&bad),
        "{report}"
    );
}

#[test]
fn pack_prints_the_archive_and_refuses_to_change_a_published_version() {
    let dir = tempfile::tempdir().unwrap();
    let vendor = Vendor::create(&dir.path().join("vendor"));
    let feed = dir.path().join("feed");
    let tree = stub_server_tree(&dir.path().join("tree"), "3.0.0", &[("notes.txt", b"one")]);
    let archive = vendor.pack("server", "3.0.0", &tree, &feed);
    assert_eq!(archive, feed.join(archive_name("3.0.0")));
    assert!(archive.exists());
    // The same tree again is fine (nothing changes); other bytes are refused.
    assert_eq!(vendor.pack("server", "3.0.0", &tree, &feed), archive);
    std::fs::write(tree.join("notes.txt"), "two").unwrap();
    let output = vendor.pack_output("server", "3.0.0", &tree, &feed);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("already in the feed with different contents"),
        "{stderr}"
    );
    let bad_version = vendor.pack_output("server", "three", &tree, &feed);
    assert!(String::from_utf8_lossy(&bad_version.stderr).contains("not a semantic version"));
}

/// A hand-made archive with one hostile entry, signed with the vendor key as if it were a
/// real release, so only the unpacking rules stand in its way.
fn hostile_package(
    site: &Site,
    name_suffix: &str,
    add_entry: impl FnOnce(&mut tar::Builder<Vec<u8>>),
) -> PathBuf {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    let binary_bytes = b"#!/bin/sh\nexit 0\n";
    header.set_size(binary_bytes.len() as u64);
    header.set_mode(0o755);
    header.set_entry_type(tar::EntryType::Regular);
    builder
        .append_data(&mut header, "bin/changeover-server", &binary_bytes[..])
        .unwrap();
    add_entry(&mut builder);
    let tar_bytes = builder.into_inner().unwrap();
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut encoder, &tar_bytes).unwrap();
    let gz = encoder.finish().unwrap();

    let version = format!("5.0.0-{name_suffix}");
    let name = archive_name(&version);
    let archive = site.dir.path().join(&name);
    std::fs::write(&archive, &gz).unwrap();
    use sha2::Digest as _;
    let entry = json!({
        "product": "changeover", "kind": "server", "version": version,
        "platform": current_platform(), "archive": name, "size": gz.len(),
        "sha256": hex::encode(sha2::Sha256::digest(&gz)), "notes": "", "date": "2026-11-28T10:00:00Z"
    });
    site.vendor.sign_as_package(&archive, &entry);
    archive
}

fn raw_entry(
    builder: &mut tar::Builder<Vec<u8>>,
    kind: tar::EntryType,
    path: &[u8],
    link: Option<&[u8]>,
) {
    let mut header = tar::Header::new_old();
    let old = header.as_old_mut();
    old.name[..path.len()].copy_from_slice(path);
    if let Some(link) = link {
        old.linkname[..link.len()].copy_from_slice(link);
    }
    header.set_entry_type(kind);
    header.set_mode(0o644);
    let contents: &[u8] = if kind == tar::EntryType::Regular {
        b"pwned\n"
    } else {
        b""
    };
    header.set_size(contents.len() as u64);
    header.set_cksum();
    builder.append(&header, contents).unwrap();
}

#[test]
fn a_failed_first_install_leaves_the_sites_files_where_they_were() {
    let site = Site::new(&["1.0.0"], "1.0.0");
    // A release that cannot take the vendor key (its config/vendor.pub is a folder), so the
    // install fails after unpacking, when the site's files would be carried in.
    let tree = server_tree(
        &site.dir.path().join("tree-broken"),
        &[("config/vendor.pub/README", b"not a key\n")],
    );
    let feed = site.dir.path().join("feed-broken");
    site.vendor.pack("server", "1.3.0", &tree, &feed);
    let root = site.dir.path().join("office2");
    let files: [(&str, &[u8]); 3] = [
        ("config/site.toml", b"company = \"Muster GmbH\"\n"),
        ("certs/server.pem", b"-----BEGIN CERTIFICATE-----\n"),
        ("backups/monday.bak", &[7u8; 100_000]),
    ];
    for (path, contents) in files {
        let file = root.join("server").join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, contents).unwrap();
    }
    let output = install(
        &root,
        &feed.join(archive_name("1.3.0")),
        &site.vendor.public_key,
    );
    assert!(!output.status.success());
    for (path, contents) in files {
        assert_eq!(
            std::fs::read(root.join("server").join(path))
                .ok()
                .as_deref(),
            Some(contents),
            "{path} lost: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert_eq!(list(&root), vec!["server".to_owned()], "leftovers");

    // A good release then installs, carrying them in.
    let output = install(&root, &site.archive("1.0.0"), &site.vendor.public_key);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for (path, contents) in files {
        assert_eq!(
            std::fs::read(root.join("server").join(path))
                .ok()
                .as_deref(),
            Some(contents),
            "{path} not carried in"
        );
    }
    assert!(root.join("server/release.json").exists());
    assert!(!root.join(".server.before-install").exists());
}

#[test]
fn install_refuses_archives_that_reach_outside_or_hold_devices_and_leaves_nothing() {
    let site = Site::new(&["1.0.0"], "1.0.0");
    type AddEntry = Box<dyn FnOnce(&mut tar::Builder<Vec<u8>>)>;
    let cases: Vec<(&str, AddEntry, &str)> = vec![
        (
            "dotdot",
            Box::new(|b| raw_entry(b, tar::EntryType::Regular, b"../escaped.txt", None)),
            "\"..\"",
        ),
        (
            "absolute",
            Box::new(|b| {
                raw_entry(
                    b,
                    tar::EntryType::Regular,
                    b"/tmp/changeover-absolute.txt",
                    None,
                )
            }),
            "absolute",
        ),
        (
            "symlink",
            Box::new(|b| {
                raw_entry(
                    b,
                    tar::EntryType::Symlink,
                    b"bin/evil",
                    Some(b"../../../etc/passwd"),
                )
            }),
            "outside the install folder",
        ),
        (
            "hardlink",
            Box::new(|b| {
                raw_entry(
                    b,
                    tar::EntryType::Link,
                    b"bin/evil",
                    Some(b"../../etc/passwd"),
                )
            }),
            "outside the install folder",
        ),
        (
            "device",
            Box::new(|b| raw_entry(b, tar::EntryType::Char, b"bin/null", None)),
            "device files",
        ),
    ];
    for (suffix, add_entry, reason) in cases {
        let archive = hostile_package(&site, suffix, add_entry);
        let root = site.dir.path().join(format!("victim-{suffix}"));
        let output = install(&root, &archive, &site.vendor.public_key);
        assert!(!output.status.success(), "{suffix} was installed");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("is refused") && stderr.contains(reason),
            "{suffix}: {stderr}"
        );
        assert!(
            !root.join("server").exists(),
            "{suffix} left an install behind"
        );
        assert!(
            !root.join(".server.installing").exists(),
            "{suffix} left staging behind"
        );
        assert!(!site.dir.path().join("escaped.txt").exists());
    }
    assert!(!Path::new("/tmp/changeover-absolute.txt").exists());

    // And a tampered real release is refused by its signature before anything is unpacked.
    let tampered = site.dir.path().join(archive_name("1.0.0"));
    std::fs::copy(site.archive("1.0.0"), &tampered).unwrap();
    std::fs::copy(
        site.feed.join(format!("{}.minisig", archive_name("1.0.0"))),
        site.dir
            .path()
            .join(format!("{}.minisig", archive_name("1.0.0"))),
    )
    .unwrap();
    flip_byte_in_the_middle(&tampered);
    let root = site.dir.path().join("victim-tampered");
    let output = install(&root, &tampered, &site.vendor.public_key);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("SHA-256"));
    assert!(!root.join("server").exists());
}

fn random_bytes(len: usize) -> Vec<u8> {
    use std::io::Read as _;
    let mut bytes = vec![0u8; len];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut bytes)
        .unwrap();
    bytes
}

#[test]
fn doctor_names_what_would_block_a_changeover_and_changes_nothing() {
    let site = Site::new(&["1.0.0", "1.1.0"], "1.0.0");
    let mut http = StaticServer::python(&site.feed, site.dir.path());
    std::fs::write(
        site.root.join("server/config/changeover.toml"),
        format!("[feed]\nurl = \"{}\"\n", http.url()),
    )
    .unwrap();
    let doctor = || {
        Command::new(site.root.join("server/bin/changeover-server"))
            .args(["doctor", "--root"])
            .arg(&site.root)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let healthy = doctor();
    let report = String::from_utf8_lossy(&healthy.stdout);
    assert!(
        healthy.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&healthy.stderr)
    );
    assert!(
        report.contains("ok    feed") && report.contains("1.1.0"),
        "{report}"
    );
    assert!(report.contains("ok    vendor key"), "{report}");
    assert!(
        report.contains("WARN  mail"),
        "SMTP is a warning only: {report}"
    );

    http.kill();
    let blocked = doctor();
    let report = String::from_utf8_lossy(&blocked.stdout);
    assert!(!blocked.status.success());
    assert!(
        report.contains("FAIL  feed") && report.contains("fix:"),
        "{report}"
    );
    // Nothing was changed: no journal, no staging, no probe left behind.
    let leftovers: Vec<String> = list(&site.root)
        .into_iter()
        .filter(|name| name.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(!site.root.join("state/changeover.json").exists());
}
