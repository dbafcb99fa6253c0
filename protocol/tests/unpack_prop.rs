//! Property tests of the unpacker: generated `.tar.gz` archives with hostile paths
//! (`..`, absolute paths, links, chains of links, duplicates, writes through links) never
//! make it write outside the target folder or leave a link there that leads out, never
//! make it panic, and a refusal leaves nothing behind. Harmless archives unpack whole.
//!
//! Each case unpacks into `<temp>/root/target` beside a sentinel file and an `outside`
//! folder, and compares everything under `<temp>` but the target before and after.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use changeover_protocol::package;
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    File,
    Folder,
    Symlink,
    HardLink,
}

impl Kind {
    fn entry_type(self) -> tar::EntryType {
        match self {
            Kind::File => tar::EntryType::Regular,
            Kind::Folder => tar::EntryType::Directory,
            Kind::Symlink => tar::EntryType::Symlink,
            Kind::HardLink => tar::EntryType::Link,
        }
    }
}

/// One generated entry. In link targets `@root` and `@outside` stand for the absolute
/// paths of the folders around the target, known only once the case's folder exists.
#[derive(Debug, Clone)]
struct Entry {
    kind: Kind,
    path: String,
    link: String,
    contents: Vec<u8>,
}

/// A path from a handful of names, so that entries collide, nest in each other and go
/// through each other's links; now and then with `..`, `.` or a leading `/`.
fn entry_path() -> impl Strategy<Value = String> {
    let part = prop::sample::select(vec!["a", "b", "c", "lib", "..", "."]);
    let parts = prop::collection::vec(part, 1..4).prop_map(|parts| parts.join("/"));
    prop_oneof![
        // A bare name half the time: those are what later entries go through.
        2 => name().prop_map(str::to_owned),
        2 => parts.clone(),
        // Mostly relative: absolute entries are refused at once and teach little.
        1 => parts.prop_map(|path| format!("/{path}")),
    ]
}

fn name() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["a", "b", "c", "lib"])
}

fn link_target() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => entry_path(),
        1 => Just("@root".to_owned()),
        1 => Just("@outside".to_owned()),
        1 => Just("@outside/secret".to_owned()),
        1 => Just("/etc".to_owned()),
    ]
}

fn entry() -> impl Strategy<Value = Entry> {
    (
        prop::sample::select(vec![
            Kind::File,
            Kind::Folder,
            Kind::Symlink,
            Kind::HardLink,
        ]),
        entry_path(),
        link_target(),
        prop::collection::vec(any::<u8>(), 0..16),
    )
        .prop_map(|(kind, path, link, contents)| Entry {
            kind,
            path,
            link,
            contents,
        })
}

/// A chain of symbolic links, each through the one before (`b -> .`, `a -> b/..`,
/// `c -> a/lib`…): each link alone looks harmless as text.
fn link_chain() -> impl Strategy<Value = Vec<Entry>> {
    let first = prop::sample::select(vec![".", "lib", "a"]);
    let step = prop::sample::select(vec!["..", ".", "", "lib", "../.."]);
    (first, prop::collection::vec((name(), step), 1..4), name()).prop_map(
        |(first, steps, first_name)| {
            let mut links = vec![Entry {
                kind: Kind::Symlink,
                path: first_name.to_owned(),
                link: first.to_owned(),
                contents: Vec::new(),
            }];
            for (name, step) in steps {
                let previous = links.last().expect("a link").path.clone();
                let link = if step.is_empty() {
                    previous
                } else {
                    format!("{previous}/{step}")
                };
                links.push(Entry {
                    kind: Kind::Symlink,
                    path: name.to_owned(),
                    link,
                    contents: Vec::new(),
                });
            }
            links
        },
    )
}

/// Random entries, maybe a chain of links, then more random entries, some of which
/// write through the chain's names.
fn archive_entries() -> impl Strategy<Value = Vec<Entry>> {
    (
        prop::collection::vec(entry(), 0..4),
        prop::option::weighted(0.7, link_chain()),
        prop::collection::vec(entry(), 0..4),
    )
        .prop_map(|(before, chain, after)| {
            let mut entries = before;
            entries.extend(chain.unwrap_or_default());
            entries.extend(after);
            entries
        })
        .prop_filter("an archive has entries", |entries| !entries.is_empty())
}

/// The folders of one case: `<temp>/root/target` and what is around it.
struct Case {
    temp: tempfile::TempDir,
}

impl Case {
    fn new() -> Case {
        let temp = tempfile::tempdir().expect("a temp folder");
        std::fs::create_dir(temp.path().join("root")).unwrap();
        std::fs::write(temp.path().join("root/sentinel"), b"untouched").unwrap();
        std::fs::create_dir(temp.path().join("outside")).unwrap();
        std::fs::write(temp.path().join("outside/secret"), b"untouched").unwrap();
        Case { temp }
    }

    fn target(&self) -> PathBuf {
        self.temp.path().join("root/target")
    }

    fn placeholders(&self, text: &str) -> String {
        text.replace(
            "@root",
            &self.temp.path().join("root").display().to_string(),
        )
        .replace(
            "@outside",
            &self.temp.path().join("outside").display().to_string(),
        )
    }

    /// Writes the entries as a `.tar.gz`, headers byte by byte (the tar crate's builder
    /// refuses hostile paths); entries whose names do not fit an old header are left out.
    fn archive(&self, entries: &[Entry]) -> PathBuf {
        let mut builder = tar::Builder::new(Vec::new());
        for entry in entries {
            let path = entry.path.as_bytes();
            let link = self.placeholders(&entry.link);
            if path.len() > 99 || link.len() > 99 {
                continue;
            }
            let mut header = tar::Header::new_old();
            let old = header.as_old_mut();
            old.name[..path.len()].copy_from_slice(path);
            if matches!(entry.kind, Kind::Symlink | Kind::HardLink) {
                old.linkname[..link.len()].copy_from_slice(link.as_bytes());
            }
            header.set_entry_type(entry.kind.entry_type());
            header.set_mode(0o755);
            let contents: &[u8] = match entry.kind {
                Kind::File => &entry.contents,
                _ => b"",
            };
            header.set_size(contents.len() as u64);
            header.set_cksum();
            builder.append(&header, contents).unwrap();
        }
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut encoder, &builder.into_inner().unwrap()).unwrap();
        let archive = self.temp.path().join("archive.tar.gz");
        std::fs::write(&archive, encoder.finish().unwrap()).unwrap();
        archive
    }

    /// Everything under the case's folder but the target and the archive.
    fn outside_the_target(&self) -> BTreeMap<PathBuf, Node> {
        let mut found = BTreeMap::new();
        snapshot(self.temp.path(), self.temp.path(), &mut found);
        found.remove(Path::new("archive.tar.gz"));
        found.retain(|path, _| !path.starts_with("root/target"));
        found
    }
}

/// What a path is, compared by content: links by their target, not followed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    File(Vec<u8>),
    Folder,
    Link(PathBuf),
    Other,
}

fn snapshot(base: &Path, dir: &Path, found: &mut BTreeMap<PathBuf, Node>) {
    for item in std::fs::read_dir(dir).expect("readable").flatten() {
        let path = item.path();
        let relative = path.strip_prefix(base).unwrap().to_owned();
        let kind = item.file_type().expect("a file type");
        let node = if kind.is_symlink() {
            Node::Link(std::fs::read_link(&path).unwrap())
        } else if kind.is_dir() {
            snapshot(base, &path, found);
            Node::Folder
        } else if kind.is_file() {
            Node::File(std::fs::read(&path).unwrap())
        } else {
            Node::Other
        };
        found.insert(relative, node);
    }
}

/// Every link under `target` obeys the unpacker's rule and, where it resolves, stays in.
fn assert_links_stay_inside(target: &Path) {
    let canonical_target = target.canonicalize().unwrap();
    let mut found = BTreeMap::new();
    snapshot(target, target, &mut found);
    for (path, node) in found {
        match node {
            Node::Link(link) => {
                assert_eq!(
                    package::link_target_problem(&link),
                    None,
                    "{} -> {} was unpacked",
                    path.display(),
                    link.display()
                );
                if let Ok(resolved) = target.join(&path).canonicalize() {
                    assert!(
                        resolved.starts_with(&canonical_target),
                        "{} -> {} leads out to {}",
                        path.display(),
                        link.display(),
                        resolved.display()
                    );
                }
            }
            Node::Other => panic!("{} is neither a file, a folder nor a link", path.display()),
            Node::File(_) | Node::Folder => {}
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn hostile_archives_never_reach_outside_the_target(
        entries in archive_entries(),
    ) {
        let case = Case::new();
        let archive = case.archive(&entries);
        let before = case.outside_the_target();
        let outcome = package::unpack(&archive, &case.target());
        prop_assert_eq!(case.outside_the_target(), before, "{:?}", outcome);
        match outcome {
            Ok(()) => assert_links_stay_inside(&case.target()),
            Err(err) => {
                prop_assert!(!case.target().exists(), "a refusal left {}: {}", case.target().display(), err);
            }
        }
    }

    #[test]
    fn harmless_archives_unpack_whole(
        files in prop::collection::btree_map((0u8..4, 0u8..4), prop::collection::vec(any::<u8>(), 0..64), 1..10),
        with_link in any::<bool>(),
    ) {
        let case = Case::new();
        let mut entries: Vec<Entry> = files
            .iter()
            .map(|((folder, file), contents)| Entry {
                kind: Kind::File,
                path: format!("dir{folder}/file{file}"),
                link: String::new(),
                contents: contents.clone(),
            })
            .collect();
        if with_link {
            let first = entries[0].path.clone();
            let name = first.rsplit('/').next().expect("a file name").to_owned();
            let folder = first.split('/').next().expect("a folder").to_owned();
            entries.push(Entry {
                kind: Kind::Symlink,
                path: format!("{folder}/link-to-{name}"),
                link: name.clone(),
                contents: Vec::new(),
            });
            entries.push(Entry {
                kind: Kind::HardLink,
                path: format!("{folder}/hard-{name}"),
                link: first,
                contents: Vec::new(),
            });
        }
        let archive = case.archive(&entries);
        package::unpack(&archive, &case.target()).expect("a harmless archive unpacks");
        for ((folder, file), contents) in &files {
            let path = case.target().join(format!("dir{folder}/file{file}"));
            prop_assert_eq!(&std::fs::read(path).unwrap(), contents);
        }
        if with_link {
            let first = &entries[0];
            let (folder, name) = first.path.split_once('/').expect("folder/file");
            for copy in [format!("{folder}/link-to-{name}"), format!("{folder}/hard-{name}")] {
                prop_assert_eq!(&std::fs::read(case.target().join(copy)).unwrap(), &first.contents);
            }
        }
        assert_links_stay_inside(&case.target());
    }
}
