//! The seccomp deny-list shared by an instance's init and every process exec'd into it.
//!
//! Default action: allow. Module loading, kexec, `open_by_handle_at`, the kernel keyring,
//! `bpf`, `perf_event_open` and swap control fail with EPERM; `umount2` with `MNT_FORCE` fails
//! with EACCES. `reboot` is allowed (init halts through it inside its PID namespace). A syscall
//! from a non-native architecture kills the process. x32 syscall numbers are covered too.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors while building or installing the seccomp filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("compiling seccomp filter: {0}")]
    Compile(String),
    #[error("installing seccomp filter: {0}")]
    Install(std::io::Error),
}

const X32_SYSCALL_BIT: i64 = 0x4000_0000;

/// Syscalls refused with EPERM.
pub const DENIED_SYSCALLS: &[(i64, &str)] = &[
    (libc::SYS_init_module, "init_module"),
    (libc::SYS_finit_module, "finit_module"),
    (libc::SYS_delete_module, "delete_module"),
    (libc::SYS_kexec_load, "kexec_load"),
    (libc::SYS_kexec_file_load, "kexec_file_load"),
    (libc::SYS_open_by_handle_at, "open_by_handle_at"),
    (libc::SYS_keyctl, "keyctl"),
    (libc::SYS_add_key, "add_key"),
    (libc::SYS_request_key, "request_key"),
    (libc::SYS_bpf, "bpf"),
    (libc::SYS_perf_event_open, "perf_event_open"),
    (libc::SYS_swapon, "swapon"),
    (libc::SYS_swapoff, "swapoff"),
];

fn arch() -> Result<TargetArch, SeccompError> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|e| SeccompError::Compile(e.to_string()))
}

fn with_x32(nr: i64) -> Vec<i64> {
    if cfg!(target_arch = "x86_64") {
        vec![nr, nr | X32_SYSCALL_BIT]
    } else {
        vec![nr]
    }
}

/// Compiles the filters: first the EPERM deny-list, then the `umount2(.., MNT_FORCE)` EACCES
/// rule (seccompiler gives one match action per filter, so these are two stacked filters).
pub fn compile_filters() -> Result<Vec<BpfProgram>, SeccompError> {
    let mut deny: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (nr, _) in DENIED_SYSCALLS {
        for n in with_x32(*nr) {
            deny.insert(n, Vec::new());
        }
    }
    let deny = SeccompFilter::new(
        deny,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch()?,
    )
    .map_err(|e| SeccompError::Compile(e.to_string()))?;

    let force = SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::MNT_FORCE as u64),
        libc::MNT_FORCE as u64,
    )
    .map_err(|e| SeccompError::Compile(e.to_string()))?;
    let rule = SeccompRule::new(vec![force]).map_err(|e| SeccompError::Compile(e.to_string()))?;
    let mut umount: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for n in with_x32(libc::SYS_umount2) {
        umount.insert(n, vec![rule.clone()]);
    }
    let umount = SeccompFilter::new(
        umount,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        arch()?,
    )
    .map_err(|e| SeccompError::Compile(e.to_string()))?;

    let mut out = Vec::new();
    for f in [deny, umount] {
        out.push(BpfProgram::try_from(f).map_err(|e| SeccompError::Compile(e.to_string()))?);
    }
    Ok(out)
}

/// Installs the deny-list on the calling thread WITHOUT setting `no_new_privs` (setuid binaries
/// inside the instance keep working). Needs `CAP_SYS_ADMIN` in the caller's user namespace.
pub fn install_deny_filter() -> Result<(), SeccompError> {
    install_programs(&compile_filters()?)
}

/// Installs already compiled filters (from [`compile_filters`]); no allocation happens here, so
/// it is safe in a freshly forked child of a multi-threaded process.
pub fn install_programs(progs: &[BpfProgram]) -> Result<(), SeccompError> {
    for prog in progs {
        install(prog)?;
    }
    Ok(())
}

fn install(prog: &BpfProgram) -> Result<(), SeccompError> {
    let len = u16::try_from(prog.len())
        .map_err(|_| SeccompError::Compile("seccomp program too long".into()))?;
    let fprog = libc::sock_fprog {
        len,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: seccompiler's sock_filter is #[repr(C)] with the same layout as libc's
    // (u16 code, u8 jt, u8 jf, u32 k); `fprog` points into `prog`, which outlives the call, and
    // the kernel copies the program before returning.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER as libc::c_ulong,
            &fprog as *const libc::sock_fprog as libc::c_ulong,
            0,
            0,
        )
    };
    if rc != 0 {
        return Err(SeccompError::Install(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile() {
        let progs = compile_filters().unwrap();
        assert_eq!(progs.len(), 2);
        assert!(
            progs
                .iter()
                .all(|p| !p.is_empty() && p.len() < u16::MAX as usize)
        );
    }

    #[test]
    fn filter_denies_in_a_child() {
        // Apply in a forked child so the test process stays unfiltered.
        let progs = compile_filters().unwrap();
        // SAFETY: the child only makes raw syscalls and calls _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = match install_programs(&progs) {
                Err(_) => 10,
                Ok(()) => {
                    // SAFETY: keyctl(KEYCTL_GET_KEYRING_ID=0, KEY_SPEC_SESSION_KEYRING=-3, 0)
                    // with plain integers.
                    let rc = unsafe { libc::syscall(libc::SYS_keyctl, 0, -3i64, 0) };
                    let e = std::io::Error::last_os_error().raw_os_error();
                    let c = c"/nonexistent-berth-test";
                    // SAFETY: a valid NUL-terminated path.
                    let rc2 = unsafe { libc::umount2(c.as_ptr(), libc::MNT_FORCE) };
                    let e2 = std::io::Error::last_os_error().raw_os_error();
                    if rc == -1 && e == Some(libc::EPERM) && rc2 == -1 && e2 == Some(libc::EACCES) {
                        0
                    } else {
                        11
                    }
                }
            };
            // SAFETY: terminate the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting on our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 0);
    }
}
