//! Capability bounding set trimming for instance processes.

/// Capabilities removed from the bounding set of every instance process (init and exec'd
/// processes): loading modules, raw I/O, setting the clock, MAC policy, wake alarms and process
/// accounting. `CAP_SYS_BOOT` stays: `reboot()` inside a PID namespace is how init halts.
pub const DROPPED_CAPS: &[(u32, &str)] = &[
    (16, "sys_module"),
    (17, "sys_rawio"),
    (20, "sys_pacct"),
    (25, "sys_time"),
    (32, "mac_override"),
    (33, "mac_admin"),
    (35, "wake_alarm"),
];

/// Drops [`DROPPED_CAPS`] from the calling thread's capability bounding set. Needs
/// `CAP_SETPCAP` in the caller's user namespace. A capability the kernel does not know
/// (EINVAL) is skipped.
pub fn drop_bounding_set() -> std::io::Result<()> {
    for (cap, _) in DROPPED_CAPS {
        // SAFETY: prctl(PR_CAPBSET_DROP) takes plain integers and touches no memory of ours.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, *cap as libc::c_ulong, 0, 0, 0) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINVAL) {
                return Err(err);
            }
        }
    }
    Ok(())
}

/// Whether `cap` is in the calling thread's bounding set.
pub fn in_bounding_set(cap: u32) -> bool {
    // SAFETY: prctl(PR_CAPBSET_READ) takes plain integers and touches no memory of ours.
    unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) == 1 }
}
