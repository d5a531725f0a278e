//! BTF encoding constants (`linux/btf.h`).

use libbpf_sys as sys;

/// The BTF header's magic (`0xeb9f` on a host-endian blob).
pub const MAGIC: u16 = {
    assert!(sys::BTF_MAGIC <= u16::MAX as u32);
    sys::BTF_MAGIC as u16
};

/// `BTF_KIND_*`, narrowed to the `u8` the parser reads from `info`; checked at compile time.
pub mod kind {
    use super::sys;

    macro_rules! kinds {
        ($($name:ident = $sys:ident),* $(,)?) => {
            $(#[doc = concat!("`", stringify!($sys), "`.")]
            pub const $name: u8 = {
                assert!(sys::$sys <= u8::MAX as u32);
                sys::$sys as u8
            };)*
        };
    }

    kinds! {
        INT = BTF_KIND_INT, PTR = BTF_KIND_PTR, ARRAY = BTF_KIND_ARRAY,
        STRUCT = BTF_KIND_STRUCT, UNION = BTF_KIND_UNION, ENUM = BTF_KIND_ENUM,
        FWD = BTF_KIND_FWD, TYPEDEF = BTF_KIND_TYPEDEF, VOLATILE = BTF_KIND_VOLATILE,
        CONST = BTF_KIND_CONST, RESTRICT = BTF_KIND_RESTRICT, FUNC = BTF_KIND_FUNC,
        FUNC_PROTO = BTF_KIND_FUNC_PROTO, VAR = BTF_KIND_VAR, DATASEC = BTF_KIND_DATASEC,
        FLOAT = BTF_KIND_FLOAT, DECL_TAG = BTF_KIND_DECL_TAG, TYPE_TAG = BTF_KIND_TYPE_TAG,
        ENUM64 = BTF_KIND_ENUM64,
    }
}

/// `BTF_INT_*`: the encoding bits of an INT's word (bits 24..28), shifted down.
pub mod int_encoding {
    use super::sys;
    /// `BTF_INT_SIGNED`.
    pub const SIGNED: u32 = sys::BTF_INT_SIGNED;
    /// `BTF_INT_CHAR`.
    pub const CHAR: u32 = sys::BTF_INT_CHAR;
    /// `BTF_INT_BOOL`.
    pub const BOOL: u32 = sys::BTF_INT_BOOL;
}

/// `BTF_VAR_*`: a VAR's linkage.
pub mod var_linkage {
    use super::sys;
    /// `BTF_VAR_STATIC`.
    pub const STATIC: u32 = sys::BTF_VAR_STATIC;
    /// `BTF_VAR_GLOBAL_ALLOCATED`.
    pub const GLOBAL_ALLOCATED: u32 = sys::BTF_VAR_GLOBAL_ALLOCATED;
    /// `BTF_VAR_GLOBAL_EXTERN`: an `extern` the loader resolves (`__kconfig`, `__ksym`).
    pub const GLOBAL_EXTERN: u32 = sys::BTF_VAR_GLOBAL_EXTERN;
}

/// `BTF_FUNC_*`: a FUNC's linkage (held in its `vlen`).
pub mod func_linkage {
    use super::sys;
    /// `BTF_FUNC_STATIC` (0): verified in its caller's context.
    pub const STATIC: u16 = {
        assert!(sys::BTF_FUNC_STATIC == 0);
        0
    };
    /// `BTF_FUNC_GLOBAL`: verified on its own, from its BTF signature.
    pub const GLOBAL: u16 = {
        assert!(sys::BTF_FUNC_GLOBAL <= u16::MAX as u32);
        sys::BTF_FUNC_GLOBAL as u16
    };
}
