//! Linux: the atomic folder exchange, mount points and processes from `/proc`.

/// Swaps two folders in one atomic step (`renameat2` with `RENAME_EXCHANGE`), so the start
/// path inside either folder is never missing.
pub fn exchange(a: &std::path::Path, b: &std::path::Path) -> std::io::Result<()> {
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        a,
        rustix::fs::CWD,
        b,
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .map_err(std::io::Error::from)
}

/// The start time of a process (clock ticks since boot), which tells a pid reused by
/// another process from the one recorded.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields count from the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    // Field 3 is the first after the name; the start time is field 22.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Whether a process runs (alive and not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Every mount point on this machine (from `/proc/self/mountinfo`; empty where it cannot
/// be read).
pub fn mount_points() -> Vec<std::path::PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|text| parse_mountinfo(&text))
        .unwrap_or_default()
}

/// The mount points of a `mountinfo` text: the fifth field, with its octal escapes
/// (`\040` for a space) decoded.
fn parse_mountinfo(text: &str) -> Vec<std::path::PathBuf> {
    text.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| {
            let bytes = field.as_bytes();
            let mut decoded = Vec::with_capacity(bytes.len());
            let mut index = 0;
            while index < bytes.len() {
                let escaped = bytes.get(index + 1..index + 4).and_then(|digits| {
                    std::str::from_utf8(digits)
                        .ok()
                        .and_then(|digits| u8::from_str_radix(digits, 8).ok())
                });
                match (bytes[index], escaped) {
                    (b'\\', Some(byte)) => {
                        decoded.push(byte);
                        index += 4;
                    }
                    (byte, _) => {
                        decoded.push(byte);
                        index += 1;
                    }
                }
            }
            std::path::PathBuf::from(String::from_utf8_lossy(&decoded).into_owned())
        })
        .collect()
}

#[cfg(test)]
mod mountinfo_tests {
    #[test]
    fn mount_points_are_read_with_their_escapes() {
        let text = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    40 22 0:35 / /srv/office/server/my\\040backups rw - tmpfs tmpfs rw\n";
        assert_eq!(
            super::parse_mountinfo(text),
            vec![
                std::path::PathBuf::from("/"),
                std::path::PathBuf::from("/srv/office/server/my backups")
            ]
        );
    }
}
