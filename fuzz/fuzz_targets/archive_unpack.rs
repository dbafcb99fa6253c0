//! The unpacker (`package::unpack`) on arbitrary bytes as a release archive. Input that
//! is not gzip (no `1f 8b` magic) is taken as a plain tar stream and compressed here
//! first, so the fuzzer can search tar headers directly.
//!
//! Each input is unpacked into `<temp>/root/target` beside a sentinel file in `root` and
//! an `outside` folder. Afterwards `root` holds nothing but the sentinel and, if the
//! archive was accepted, `target`; nothing else changed; and every link in `target` obeys
//! the unpacker's rule and, where it resolves, stays inside.

#![no_main]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use changeover_protocol::package;
use libfuzzer_sys::fuzz_target;

struct Folders {
    _temp: tempfile::TempDir,
    base: PathBuf,
}

fn folders() -> &'static Folders {
    static FOLDERS: std::sync::OnceLock<Folders> = std::sync::OnceLock::new();
    FOLDERS.get_or_init(|| {
        let temp = tempfile::tempdir().expect("a temp folder");
        let base = temp.path().canonicalize().expect("a real path");
        std::fs::create_dir(base.join("root")).unwrap();
        std::fs::write(base.join("root/sentinel"), b"untouched").unwrap();
        std::fs::create_dir(base.join("outside")).unwrap();
        std::fs::write(base.join("outside/secret"), b"untouched").unwrap();
        Folders { _temp: temp, base }
    })
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .expect("readable")
        .map(|item| {
            item.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|item| (*item).to_owned()).collect()
}

fn assert_links_stay_inside(target: &Path, dir: &Path) {
    for item in std::fs::read_dir(dir).expect("readable") {
        let item = item.expect("an entry");
        let path = item.path();
        let kind = item.file_type().expect("a file type");
        if kind.is_symlink() {
            let link = std::fs::read_link(&path).expect("a link");
            assert_eq!(
                package::link_target_problem(&link),
                None,
                "{} -> {} was unpacked",
                path.display(),
                link.display()
            );
            if let Ok(resolved) = path.canonicalize() {
                assert!(
                    resolved.starts_with(target),
                    "{} -> {} leads out to {}",
                    path.display(),
                    link.display(),
                    resolved.display()
                );
            }
        } else if kind.is_dir() {
            assert_links_stay_inside(target, &path);
        } else {
            assert!(kind.is_file(), "{} is a special file", path.display());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let folders = folders();
    let base = &folders.base;
    let archive = base.join("archive.tar.gz");
    let bytes = if data.starts_with(&[0x1f, 0x8b]) {
        data.to_vec()
    } else {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut encoder, data).expect("compresses");
        encoder.finish().expect("compresses")
    };
    std::fs::write(&archive, bytes).expect("the archive is written");
    let target = base.join("root/target");
    let outcome = package::unpack(&archive, &target);

    assert_eq!(names(base), set(&["archive.tar.gz", "outside", "root"]));
    assert_eq!(names(&base.join("outside")), set(&["secret"]));
    assert_eq!(
        std::fs::read(base.join("outside/secret")).unwrap(),
        b"untouched"
    );
    assert_eq!(
        std::fs::read(base.join("root/sentinel")).unwrap(),
        b"untouched"
    );
    match outcome {
        Ok(()) => {
            assert_eq!(names(&base.join("root")), set(&["sentinel", "target"]));
            assert_links_stay_inside(&target, &target);
            std::fs::remove_dir_all(&target).expect("the target is removed");
        }
        Err(_) => assert_eq!(
            names(&base.join("root")),
            set(&["sentinel"]),
            "a refused archive left something behind"
        ),
    }
});
