//! Screening an agent update offer before anything in it is believed.
//!
//! An offer comes from the server, and the agent does not trust a server with its
//! workstation's disk. Two gates stand before the download:
//!
//! 1. [`screen`]: the offer's plain fields against fixed limits — an archive no larger
//!    than [`MAX_DOWNLOAD_BYTES`], a path on this server without `..`, plain names;
//! 2. [`SignedComment::verify`]: the signature's trusted comment — the vendor's description
//!    of the archive, its size among it — is checked with the vendor key on its own, so the
//!    size is the vendor's word and not the server's before a single byte is fetched.
//!
//! The archive's bytes are verified as they arrive (`package::PackageVerifier`); fetching
//! and installing are `self_update`'s.

use base64::Engine as _;
use changeover_protocol::AgentUpdateOffer;

/// The largest agent archive the agent downloads, whatever the offer and its signature
/// say. Agent releases are a few to a few tens of MB; a fixed cap means that neither a
/// hostile server nor a mistake in a signed entry can fill a workstation's disk.
pub const MAX_DOWNLOAD_BYTES: u64 = 512 * 1024 * 1024;

/// The longest offer path the agent requests.
const MAX_PATH_CHARS: usize = 1024;

/// The longest version and archive name the agent accepts.
const MAX_NAME_CHARS: usize = 255;

/// Checks an offer's plain fields; the error names the refused value.
pub fn screen(offer: &AgentUpdateOffer) -> Result<(), String> {
    if offer.size > MAX_DOWNLOAD_BYTES {
        return Err(format!(
            "the offered archive is {} bytes, above the agent's download cap of \
             {MAX_DOWNLOAD_BYTES} bytes",
            offer.size
        ));
    }
    if offer.size == 0 {
        return Err("the offered archive is 0 bytes".to_owned());
    }
    let path_is_plain = offer.path.starts_with('/')
        && !offer.path.starts_with("//")
        && offer.path.chars().count() <= MAX_PATH_CHARS
        && !offer.path.contains(['\\', '?', '#', '%'])
        && !offer.path.chars().any(char::is_control)
        && !offer
            .path
            .split('/')
            .any(|segment| segment == "." || segment == "..");
    if !path_is_plain {
        return Err(format!(
            "the offer's path {} is not a plain path on this server (no `..`, `.`, `\\`, \
             `%`, `?`, `#` or control characters)",
            shown(&offer.path)
        ));
    }
    let archive_is_plain = !offer.archive.is_empty()
        && offer.archive.len() <= MAX_NAME_CHARS
        && !offer.archive.starts_with('.')
        && offer
            .archive
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+'));
    if !archive_is_plain {
        return Err(format!(
            "the archive name {} is not a plain file name",
            shown(&offer.archive)
        ));
    }
    if offer.version.len() > MAX_NAME_CHARS {
        return Err(format!(
            "the offered version {} is longer than {MAX_NAME_CHARS} characters",
            shown(&offer.version)
        ));
    }
    if offer.sha256.len() != 64 || !offer.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "the offered SHA-256 {} is not 64 hex digits",
            shown(&offer.sha256)
        ));
    }
    Ok(())
}

// A value from the server as a message shows it: quoted, escaped, and not 60 KiB long.
fn shown(text: &str) -> String {
    const SHOWN_CHARS: usize = 120;
    let mut cut: String = text.chars().take(SHOWN_CHARS).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    format!("{cut:?}")
}

/// The vendor key as far as checking a trusted comment needs it.
///
/// `minisign-verify` checks the trusted comment only together with the whole archive, at
/// the end of the download; this checks the same global signature (Ed25519 over the
/// archive's signature and the trusted comment) before the download begins.
#[derive(Debug, Clone)]
pub struct SignedComment {
    key_id: [u8; 8],
    key: [u8; 32],
}

impl SignedComment {
    /// Reads a minisign public key file's text (or a bare base64 key), as
    /// `package::VendorKey::decode` does.
    pub fn from_key_text(text: &str) -> Result<SignedComment, String> {
        let text = text.trim();
        let line = if text.lines().count() > 1 {
            text.lines().nth(1).unwrap_or_default()
        } else {
            text
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(line.trim())
            .map_err(|err| format!("not a minisign public key ({err})"))?;
        if bytes.len() != 42 || bytes[0] != b'E' {
            return Err("not a minisign Ed25519 public key".to_owned());
        }
        let mut key_id = [0u8; 8];
        key_id.copy_from_slice(&bytes[2..10]);
        let mut key = [0u8; 32];
        key.copy_from_slice(&bytes[10..42]);
        Ok(SignedComment { key_id, key })
    }

    /// Checks that `signature_text` (a `.minisig`) was made with this key and that its
    /// trusted comment is the one the vendor signed. Parses the lines exactly as
    /// `minisign-verify` does, so both read the same comment.
    pub fn verify(&self, signature_text: &str) -> Result<(), String> {
        let unreadable = |why: &str| format!("the offer's signature is unreadable: {why}");
        let mut lines = signature_text.lines();
        let _untrusted = lines.next().ok_or_else(|| unreadable("empty"))?;
        let signature = lines
            .next()
            .and_then(|line| base64::engine::general_purpose::STANDARD.decode(line).ok())
            .filter(|bytes| bytes.len() == 74)
            .ok_or_else(|| unreadable("no signature line"))?;
        let comment = lines
            .next()
            .and_then(|line| line.strip_prefix("trusted comment: "))
            .ok_or_else(|| unreadable("no trusted comment"))?;
        let global = lines
            .next()
            .and_then(|line| base64::engine::general_purpose::STANDARD.decode(line).ok())
            .filter(|bytes| bytes.len() == 64)
            .ok_or_else(|| unreadable("no global signature"))?;
        if signature[2..10] != self.key_id {
            return Err(
                "the offer's signature was made with another key than the vendor key \
                        this agent trusts"
                    .to_owned(),
            );
        }
        let mut signed = Vec::with_capacity(64 + comment.len());
        signed.extend_from_slice(&signature[10..74]);
        signed.extend_from_slice(comment.as_bytes());
        aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ED25519, &self.key)
            .verify(&signed, &global)
            .map_err(|_| {
                "the trusted comment of the offer's signature does not verify with the vendor \
                 key: the description of the archive (its size, hash, version) was altered"
                    .to_owned()
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer() -> AgentUpdateOffer {
        AgentUpdateOffer {
            version: "1.3.0".to_owned(),
            platform: "linux-x86_64".to_owned(),
            archive: "agent-1.3.0-linux-x86_64.tar.gz".to_owned(),
            size: 12_000_000,
            sha256: "ab".repeat(32),
            path: "/agent-updates/agent-1.3.0-linux-x86_64.tar.gz".to_owned(),
            signature: String::new(),
        }
    }

    #[test]
    fn a_plain_offer_passes() {
        assert_eq!(screen(&offer()), Ok(()));
        let at_the_cap = AgentUpdateOffer {
            size: MAX_DOWNLOAD_BYTES,
            ..offer()
        };
        assert_eq!(screen(&at_the_cap), Ok(()));
    }

    #[test]
    fn sizes_beyond_the_cap_are_refused_naming_the_size() {
        let huge = AgentUpdateOffer {
            size: u64::MAX,
            ..offer()
        };
        let reason = screen(&huge).unwrap_err();
        assert!(reason.contains("18446744073709551615 bytes"), "{reason}");
        let just_over = AgentUpdateOffer {
            size: MAX_DOWNLOAD_BYTES + 1,
            ..offer()
        };
        assert!(screen(&just_over).is_err());
        let empty = AgentUpdateOffer { size: 0, ..offer() };
        assert!(screen(&empty).is_err());
    }

    #[test]
    fn paths_and_names_must_be_plain() {
        for path in [
            "/agent-updates/../../etc/passwd",
            "/agent-updates/..",
            "/./agent.tar.gz",
            "agent-updates/a.tar.gz",
            "//attacker.example/a.tar.gz",
            "http://attacker.example/a.tar.gz",
            "/agent-updates/%2e%2e/secret",
            "/agent-updates\\..\\secret",
            "/a\u{1b}[2J",
            "/a?b",
        ] {
            let bad = AgentUpdateOffer {
                path: path.to_owned(),
                ..offer()
            };
            let reason = screen(&bad).unwrap_err();
            assert!(reason.contains("not a plain path"), "{path:?}: {reason}");
        }
        let long = AgentUpdateOffer {
            path: format!("/{}", "a".repeat(2000)),
            ..offer()
        };
        assert!(screen(&long).is_err());
        for archive in ["", ".hidden.tar.gz", "a/b.tar.gz", "a b.tar.gz"] {
            let bad = AgentUpdateOffer {
                archive: archive.to_owned(),
                ..offer()
            };
            assert!(screen(&bad).is_err(), "{archive:?}");
        }
        let bad_hash = AgentUpdateOffer {
            sha256: "xyz".to_owned(),
            ..offer()
        };
        assert!(screen(&bad_hash).is_err());
    }

    struct Vendor {
        public: String,
        secret: minisign::SecretKey,
    }

    fn vendor() -> Vendor {
        let pair = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        Vendor {
            public: pair.pk.to_box().unwrap().to_string(),
            secret: pair.sk,
        }
    }

    fn sign(vendor: &Vendor, data: &[u8], comment: &str) -> String {
        minisign::sign(None, &vendor.secret, data, Some(comment), None)
            .unwrap()
            .to_string()
    }

    #[test]
    fn a_trusted_comment_verifies_before_any_byte_of_the_archive() {
        let vendor = vendor();
        let key = SignedComment::from_key_text(&vendor.public).unwrap();
        let signature = sign(&vendor, b"the archive", r#"{"size":11}"#);
        assert_eq!(key.verify(&signature), Ok(()));
        // The bare base64 key reads the same.
        let bare = vendor.public.lines().nth(1).unwrap();
        assert!(SignedComment::from_key_text(bare).is_ok());
        // What minisign-verify reads as the comment is what was checked.
        let parsed = minisign_verify::Signature::decode(&signature).unwrap();
        assert_eq!(parsed.trusted_comment(), r#"{"size":11}"#);
    }

    #[test]
    fn an_altered_trusted_comment_is_refused() {
        let vendor = vendor();
        let key = SignedComment::from_key_text(&vendor.public).unwrap();
        let signature = sign(&vendor, b"the archive", r#"{"size":11}"#);
        let forged = signature.replace(r#"{"size":11}"#, r#"{"size":18446744073709551615}"#);
        assert_ne!(forged, signature);
        let reason = key.verify(&forged).unwrap_err();
        assert!(reason.contains("does not verify"), "{reason}");
    }

    #[test]
    fn a_signature_by_another_key_is_refused() {
        let vendor = vendor();
        let stranger = self::vendor();
        let key = SignedComment::from_key_text(&vendor.public).unwrap();
        let signature = sign(&stranger, b"the archive", r#"{"size":11}"#);
        let reason = key.verify(&signature).unwrap_err();
        assert!(reason.contains("another key"), "{reason}");
        for garbage in ["", "one line", "untrusted comment: x\nAAAA\nnope\nAAAA"] {
            assert!(key.verify(garbage).is_err(), "{garbage:?}");
        }
        assert!(SignedComment::from_key_text("not a key").is_err());
    }
}
