//! What the host machine offers, read before large host allocations so that a model
//! or dataset too big for it is refused with its size instead of aborting the process.

/// Bytes in a GiB, for messages.
pub const GIB: f64 = (1u64 << 30) as f64;

/// This machine's memory (`MemTotal` in /proc/meminfo), where the system says.
pub fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Mesa's Vulkan loader wants `XDG_RUNTIME_DIR` to name a private directory and says
/// so on every device it opens when it does not. Where it is unset or not a
/// directory, point it at a private one under the temporary directory, once, before
/// the first device opens.
pub fn ensure_runtime_dir() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let valid = std::env::var_os("XDG_RUNTIME_DIR")
            .is_some_and(|dir| std::path::Path::new(&dir).is_dir());
        if valid {
            return;
        }
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let uid = user_id();
        let dir = std::env::temp_dir().join(format!("altc-runtime-{uid}"));
        let made = std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)));
        // Only a directory of this user's own: one another user made first is not
        // private to this one.
        let own = std::fs::metadata(&dir).is_ok_and(|m| m.uid() == uid);
        if made.is_ok() && own {
            std::env::set_var("XDG_RUNTIME_DIR", &dir);
        }
    });
}

/// The user id, from the owner of /proc/self (no libc call needed).
fn user_id() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid())
}
