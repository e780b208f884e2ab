//! The AMX kernel: TDPBF16PS multiplies 16 x 32 bf16 tiles into 16 x 16 f32 accumulators.
//!
//! Linux gives the tile state only to processes that ask for it
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); without that request the first tile
//! instruction faults. [`detect`] checks CPUID and makes the request; each thread loads the tile
//! configuration before its first tile instruction and releases the state after its last.

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(super) fn detect() -> bool {
    if std::env::var_os("HARNESS_NO_AMX").is_some() {
        return false;
    }
    #[allow(unused_unsafe)] // cpuid is a safe intrinsic in newer compilers
    // SAFETY: CPUID is available on every x86-64 CPU.
    let (max_leaf, leaf7) = unsafe {
        (
            std::arch::x86_64::__cpuid(0).eax,
            std::arch::x86_64::__cpuid_count(7, 0),
        )
    };
    if max_leaf < 7 {
        return false;
    }
    let tile = leaf7.edx & (1 << 24) != 0;
    let bf16 = leaf7.edx & (1 << 22) != 0;
    if !(tile && bf16) {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments; it fails cleanly where unsupported.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    r == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
pub(super) fn detect() -> bool {
    false
}

/// The tile configuration: palette 1; tiles 0-3 are 16 x 16 f32 accumulators, 4-5 hold A
/// (16 rows x 32 bf16), 6-7 hold B (16 pair-rows x 16 pairs). All rows are 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn load_config() {
    let cfg = &CONFIG as *const TileConfig;
    std::arch::asm!("ldtilecfg [{0}]", in(reg) cfg, options(nostack, readonly));
}

#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn release() {
    std::arch::asm!("tilerelease", options(nostack, nomem));
}

/// One 32 x 32 block of the product: rows of `a` (32 x k), two B panels (k x 16 each), into
/// `out` (32 x 32, row-major).
///
/// # Safety
/// The tile state must have been granted ([`detect`]) and this thread's configuration loaded
/// ([`load_config`]); `a` holds 32 rows of k values and each panel k/2 pair-rows of 32, k a
/// multiple of 32.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn block(a: &[u16], p0: &[u16], p1: &[u16], k: usize, out: &mut [f32; 1024]) {
    use std::arch::asm;
    let a_stride = k * 2; // bytes per row of A
    let b_stride = 64usize; // bytes per pair-row of a panel
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        options(nostack, nomem)
    );
    for kb in 0..k / 32 {
        let a0 = a.as_ptr().add(kb * 32);
        let a1 = a.as_ptr().add(16 * k + kb * 32);
        let b0 = p0.as_ptr().add(kb * 16 * 32);
        let b1 = p1.as_ptr().add(kb * 16 * 32);
        asm!(
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a0,
            a1 = in(reg) a1,
            b0 = in(reg) b0,
            b1 = in(reg) b1,
            sa = in(reg) a_stride,
            sb = in(reg) b_stride,
            options(nostack, readonly)
        );
    }
    let c = out.as_mut_ptr();
    let sc = 32 * 4usize; // bytes per row of out
    asm!(
        "tilestored [{c0} + {s}*1], tmm0",
        "tilestored [{c1} + {s}*1], tmm1",
        "tilestored [{c2} + {s}*1], tmm2",
        "tilestored [{c3} + {s}*1], tmm3",
        c0 = in(reg) c,
        c1 = in(reg) c.add(16),
        c2 = in(reg) c.add(16 * 32),
        c3 = in(reg) c.add(16 * 32 + 16),
        s = in(reg) sc,
        options(nostack)
    );
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn load_config() {}

#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn release() {}

#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn block(_: &[u16], _: &[u16], _: &[u16], _: usize, _: &mut [f32; 1024]) {
    unreachable!("AMX is never available off x86-64")
}
