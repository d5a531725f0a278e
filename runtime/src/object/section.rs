//! libbpf's section-name conventions: which kernel program type a `SEC("...")` declares and
//! what it attaches to.

use libbpf_sys as sys;

/// What kind of program a section declares, in libbpf's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProgramKind {
    /// `uprobe`, `uprobe.s` (sleepable): entry of a userspace function (`BPF_PROG_TYPE_KPROBE`).
    Uprobe,
    /// `uretprobe`, `uretprobe.s`: return of a userspace function (`BPF_PROG_TYPE_KPROBE`).
    Uretprobe,
    /// `uprobe.multi`, `uretprobe.multi`: several userspace functions at once
    /// (`BPF_TRACE_UPROBE_MULTI`).
    UprobeMulti,
    /// `usdt`: a USDT probe of a userspace binary (`BPF_PROG_TYPE_KPROBE`).
    Usdt,
    /// `kprobe`: entry of a kernel function.
    Kprobe,
    /// `kretprobe`: return of a kernel function.
    Kretprobe,
    /// `kprobe.multi`, `kretprobe.multi`: several kernel functions (`BPF_TRACE_KPROBE_MULTI`).
    KprobeMulti,
    /// `ksyscall`, `kretsyscall`: entry or return of a syscall, by syscall name.
    Ksyscall,
    /// `tracepoint`, `tp`: a kernel tracepoint (`BPF_PROG_TYPE_TRACEPOINT`).
    Tracepoint,
    /// `raw_tracepoint`, `raw_tp` and their `.w` (writable) forms.
    RawTracepoint,
    /// `tp_btf`: a BTF-typed raw tracepoint (`BPF_PROG_TYPE_TRACING`, `BPF_TRACE_RAW_TP`).
    TpBtf,
    /// `fentry`, `fentry.s`: entry of a kernel function through a BPF trampoline.
    Fentry,
    /// `fexit`, `fexit.s`: exit of a kernel function through a BPF trampoline.
    Fexit,
    /// `fmod_ret`: a trampoline program that may override a kernel function's return value.
    FmodRet,
    /// `lsm`, `lsm.s`: an LSM hook (`BPF_PROG_TYPE_LSM`).
    Lsm,
    /// `iter`: a BPF iterator (`BPF_TRACE_ITER`).
    Iter,
    /// `xdp`, `xdp.frags`: an XDP packet program.
    Xdp,
    /// `socket`: a socket filter (`BPF_PROG_TYPE_SOCKET_FILTER`).
    SocketFilter,
    /// `sk_reuseport`: selects a socket of a `SO_REUSEPORT` group.
    SkReuseport,
    /// `tc`, `classifier`: a tc classifier (`BPF_PROG_TYPE_SCHED_CLS`).
    SchedCls,
    /// `action`: a tc action (`BPF_PROG_TYPE_SCHED_ACT`).
    SchedAct,
    /// `cgroup_skb/ingress`, `cgroup_skb/egress`, `cgroup/skb`: cgroup packet filter.
    CgroupSkb,
    /// `cgroup/sock_create`, `cgroup/sock`: socket creation in a cgroup.
    CgroupSock,
    /// `cgroup/connect4|6`, `cgroup/bind4|6`: socket address hooks of a cgroup.
    CgroupSockAddr,
    /// `cgroup/sysctl`: sysctl access from a cgroup.
    CgroupSysctl,
    /// `cgroup/getsockopt`, `cgroup/setsockopt`.
    CgroupSockopt,
    /// `cgroup/dev`: device access control of a cgroup.
    CgroupDevice,
    /// `sockops`: TCP socket operations (`BPF_PROG_TYPE_SOCK_OPS`).
    SockOps,
    /// `sk_skb`, `sk_skb/stream_parser`, `sk_skb/stream_verdict`: sockmap stream programs.
    SkSkb,
    /// `sk_msg`: sockmap message verdicts.
    SkMsg,
    /// `sk_lookup`: socket lookup for incoming connections.
    SkLookup,
    /// `flow_dissector`: the network flow dissector.
    FlowDissector,
    /// `lwt_in`, `lwt_out`, `lwt_xmit`, `lwt_seg6local`: lightweight tunnel programs.
    Lwt,
    /// `perf_event`: runs on a perf event's overflow (`BPF_PROG_TYPE_PERF_EVENT`).
    PerfEvent,
    /// `syscall`: a sleepable program run by `BPF_PROG_RUN` (`BPF_PROG_TYPE_SYSCALL`).
    Syscall,
    /// `struct_ops`: an implementation of a kernel `struct_ops` callback.
    StructOps,
    /// `netfilter`: a netfilter hook (`BPF_PROG_TYPE_NETFILTER`).
    Netfilter,
    /// An executable section whose name libbpf conventions do not define. Kept (not an error for
    /// the object) so that the rest of the object still loads; such a program has no kernel
    /// program type, so the verifier gate refuses it and only `--no-verify` runs it.
    Unknown,
}

/// Where a program attaches, parsed from its section name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachTarget {
    /// Nothing in the section name (e.g. `SEC("xdp")`, bare `SEC("uprobe")`).
    None,
    /// `uprobe[.s]/PATH:FUNC[+OFF]`, `uretprobe/...`; `symbol` is `None` for `PATH:0xADDR`.
    Uprobe {
        /// The binary or library: everything before the first `:`.
        path: Option<String>,
        /// The function name; `None` for an address or for a path with no `:FUNC` part.
        symbol: Option<String>,
        /// Bytes after `symbol`, or the address itself when `symbol` is `None` (0 if absent).
        offset: u64,
        /// A `uretprobe` (or `uretprobe.multi`): runs on return.
        retprobe: bool,
        /// A `.s` section: the program may sleep (`BPF_F_SLEEPABLE`).
        sleepable: bool,
    },
    /// `usdt/PATH:PROVIDER:NAME`.
    Usdt {
        /// The binary or library that holds the probe.
        path: String,
        /// The probe's provider (the first part of its `provider:name`).
        provider: String,
        /// The probe's name within its provider.
        name: String,
    },
    /// `kprobe/FUNC[+OFF]`, `kretprobe/FUNC`, `ksyscall/NAME`.
    Kprobe {
        /// The kernel function (or syscall name, for `ksyscall`); `None` for a bare address.
        symbol: Option<String>,
        /// Bytes after `symbol`, or the address itself when `symbol` is `None`.
        offset: u64,
        /// A `kret...` section: runs on return.
        retprobe: bool,
    },
    /// `tracepoint/CATEGORY/NAME` or `tp/CATEGORY/NAME`.
    Tracepoint {
        /// The tracepoint's subsystem (the directory under `events/`, e.g. `syscalls`).
        category: String,
        /// The tracepoint within it (e.g. `sys_enter_write`).
        name: String,
    },
    /// `raw_tp/NAME`, `raw_tracepoint/NAME`, `tp_btf/NAME`.
    RawTracepoint {
        /// The tracepoint's name (e.g. `sched_switch`).
        name: String,
    },
    /// `fentry/FUNC`, `fexit/FUNC`, `lsm/HOOK`, `iter/TARGET`: a kernel BTF function or hook.
    BtfTarget {
        /// The kernel function, LSM hook or iterator target, as named in kernel BTF.
        name: String,
    },
    /// Anything else after the first `/` (e.g. `cgroup_skb/ingress`).
    Other(String),
}

/// The result of matching one section name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionInfo {
    /// Which convention the name matched.
    pub kind: ProgramKind,
    /// `bpf_prog_type` to load the program as in the kernel; `None` for [`ProgramKind::Unknown`].
    pub kernel_prog_type: Option<u32>,
    /// `expected_attach_type` to pass at load (0 when the type needs none).
    pub expected_attach_type: u32,
    /// Load flags (`BPF_F_SLEEPABLE`, `BPF_F_XDP_HAS_FRAGS`).
    pub prog_flags: u32,
    /// What the rest of the name (after `kind`'s prefix and `/`) says to attach to.
    pub attach: AttachTarget,
}

struct Def {
    name: &'static str,
    kind: ProgramKind,
    prog_type: u32,
    attach_type: u32,
    flags: u32,
}

const fn d(name: &'static str, kind: ProgramKind, prog_type: u32, attach_type: u32) -> Def {
    Def {
        name,
        kind,
        prog_type,
        attach_type,
        flags: 0,
    }
}

const fn ds(name: &'static str, kind: ProgramKind, prog_type: u32, attach_type: u32) -> Def {
    Def {
        name,
        kind,
        prog_type,
        attach_type,
        flags: sys::BPF_F_SLEEPABLE,
    }
}

use ProgramKind as K;

/// Longest names first where one is a prefix of another is not needed: matching is exact or
/// `name/...`, so `uprobe` never matches `uprobe.s`.
static DEFS: &[Def] = &[
    d("uprobe", K::Uprobe, sys::BPF_PROG_TYPE_KPROBE, 0),
    ds("uprobe.s", K::Uprobe, sys::BPF_PROG_TYPE_KPROBE, 0),
    d("uretprobe", K::Uretprobe, sys::BPF_PROG_TYPE_KPROBE, 0),
    ds("uretprobe.s", K::Uretprobe, sys::BPF_PROG_TYPE_KPROBE, 0),
    d(
        "uprobe.multi",
        K::UprobeMulti,
        sys::BPF_PROG_TYPE_KPROBE,
        sys::BPF_TRACE_UPROBE_MULTI,
    ),
    d(
        "uretprobe.multi",
        K::UprobeMulti,
        sys::BPF_PROG_TYPE_KPROBE,
        sys::BPF_TRACE_UPROBE_MULTI,
    ),
    d("usdt", K::Usdt, sys::BPF_PROG_TYPE_KPROBE, 0),
    d("kprobe", K::Kprobe, sys::BPF_PROG_TYPE_KPROBE, 0),
    d("kretprobe", K::Kretprobe, sys::BPF_PROG_TYPE_KPROBE, 0),
    d(
        "kprobe.multi",
        K::KprobeMulti,
        sys::BPF_PROG_TYPE_KPROBE,
        sys::BPF_TRACE_KPROBE_MULTI,
    ),
    d(
        "kretprobe.multi",
        K::KprobeMulti,
        sys::BPF_PROG_TYPE_KPROBE,
        sys::BPF_TRACE_KPROBE_MULTI,
    ),
    d("ksyscall", K::Ksyscall, sys::BPF_PROG_TYPE_KPROBE, 0),
    d("kretsyscall", K::Ksyscall, sys::BPF_PROG_TYPE_KPROBE, 0),
    d(
        "tracepoint",
        K::Tracepoint,
        sys::BPF_PROG_TYPE_TRACEPOINT,
        0,
    ),
    d("tp", K::Tracepoint, sys::BPF_PROG_TYPE_TRACEPOINT, 0),
    d(
        "raw_tracepoint",
        K::RawTracepoint,
        sys::BPF_PROG_TYPE_RAW_TRACEPOINT,
        0,
    ),
    d(
        "raw_tp",
        K::RawTracepoint,
        sys::BPF_PROG_TYPE_RAW_TRACEPOINT,
        0,
    ),
    d(
        "raw_tracepoint.w",
        K::RawTracepoint,
        sys::BPF_PROG_TYPE_RAW_TRACEPOINT_WRITABLE,
        0,
    ),
    d(
        "raw_tp.w",
        K::RawTracepoint,
        sys::BPF_PROG_TYPE_RAW_TRACEPOINT_WRITABLE,
        0,
    ),
    d(
        "tp_btf",
        K::TpBtf,
        sys::BPF_PROG_TYPE_TRACING,
        sys::BPF_TRACE_RAW_TP,
    ),
    d(
        "fentry",
        K::Fentry,
        sys::BPF_PROG_TYPE_TRACING,
        sys::BPF_TRACE_FENTRY,
    ),
    ds(
        "fentry.s",
        K::Fentry,
        sys::BPF_PROG_TYPE_TRACING,
        sys::BPF_TRACE_FENTRY,
    ),
    d(
        "fexit",
        K::Fexit,
        sys::BPF_PROG_TYPE_TRACING,
        sys::BPF_TRACE_FEXIT,
    ),
    ds(
        "fexit.s",
        K::Fexit,
        sys::BPF_PROG_TYPE_TRACING,
        sys::BPF_TRACE_FEXIT,
    ),
    d(
        "fmod_ret",
        K::FmodRet,
        sys::BPF_PROG_TYPE_TRACING,
        sys::BPF_MODIFY_RETURN,
    ),
    d("lsm", K::Lsm, sys::BPF_PROG_TYPE_LSM, sys::BPF_LSM_MAC),
    ds("lsm.s", K::Lsm, sys::BPF_PROG_TYPE_LSM, sys::BPF_LSM_MAC),
    d(
        "iter",
        K::Iter,
        sys::BPF_PROG_TYPE_TRACING,
        sys::BPF_TRACE_ITER,
    ),
    d("xdp", K::Xdp, sys::BPF_PROG_TYPE_XDP, sys::BPF_XDP),
    Def {
        name: "xdp.frags",
        kind: K::Xdp,
        prog_type: sys::BPF_PROG_TYPE_XDP,
        attach_type: sys::BPF_XDP,
        flags: sys::BPF_F_XDP_HAS_FRAGS,
    },
    d("perf_event", K::PerfEvent, sys::BPF_PROG_TYPE_PERF_EVENT, 0),
    d(
        "socket",
        K::SocketFilter,
        sys::BPF_PROG_TYPE_SOCKET_FILTER,
        0,
    ),
    d(
        "sk_reuseport",
        K::SkReuseport,
        sys::BPF_PROG_TYPE_SK_REUSEPORT,
        sys::BPF_SK_REUSEPORT_SELECT,
    ),
    d("tc", K::SchedCls, sys::BPF_PROG_TYPE_SCHED_CLS, 0),
    d("classifier", K::SchedCls, sys::BPF_PROG_TYPE_SCHED_CLS, 0),
    d("action", K::SchedAct, sys::BPF_PROG_TYPE_SCHED_ACT, 0),
    d(
        "cgroup_skb/ingress",
        K::CgroupSkb,
        sys::BPF_PROG_TYPE_CGROUP_SKB,
        sys::BPF_CGROUP_INET_INGRESS,
    ),
    d(
        "cgroup_skb/egress",
        K::CgroupSkb,
        sys::BPF_PROG_TYPE_CGROUP_SKB,
        sys::BPF_CGROUP_INET_EGRESS,
    ),
    d("cgroup/skb", K::CgroupSkb, sys::BPF_PROG_TYPE_CGROUP_SKB, 0),
    d(
        "cgroup/sock_create",
        K::CgroupSock,
        sys::BPF_PROG_TYPE_CGROUP_SOCK,
        sys::BPF_CGROUP_INET_SOCK_CREATE,
    ),
    d(
        "cgroup/sock",
        K::CgroupSock,
        sys::BPF_PROG_TYPE_CGROUP_SOCK,
        sys::BPF_CGROUP_INET_SOCK_CREATE,
    ),
    d(
        "cgroup/connect4",
        K::CgroupSockAddr,
        sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        sys::BPF_CGROUP_INET4_CONNECT,
    ),
    d(
        "cgroup/connect6",
        K::CgroupSockAddr,
        sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        sys::BPF_CGROUP_INET6_CONNECT,
    ),
    d(
        "cgroup/bind4",
        K::CgroupSockAddr,
        sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        sys::BPF_CGROUP_INET4_BIND,
    ),
    d(
        "cgroup/bind6",
        K::CgroupSockAddr,
        sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        sys::BPF_CGROUP_INET6_BIND,
    ),
    d(
        "cgroup/sysctl",
        K::CgroupSysctl,
        sys::BPF_PROG_TYPE_CGROUP_SYSCTL,
        sys::BPF_CGROUP_SYSCTL,
    ),
    d(
        "cgroup/getsockopt",
        K::CgroupSockopt,
        sys::BPF_PROG_TYPE_CGROUP_SOCKOPT,
        sys::BPF_CGROUP_GETSOCKOPT,
    ),
    d(
        "cgroup/setsockopt",
        K::CgroupSockopt,
        sys::BPF_PROG_TYPE_CGROUP_SOCKOPT,
        sys::BPF_CGROUP_SETSOCKOPT,
    ),
    d(
        "cgroup/dev",
        K::CgroupDevice,
        sys::BPF_PROG_TYPE_CGROUP_DEVICE,
        sys::BPF_CGROUP_DEVICE,
    ),
    d(
        "sockops",
        K::SockOps,
        sys::BPF_PROG_TYPE_SOCK_OPS,
        sys::BPF_CGROUP_SOCK_OPS,
    ),
    d(
        "sk_skb/stream_parser",
        K::SkSkb,
        sys::BPF_PROG_TYPE_SK_SKB,
        sys::BPF_SK_SKB_STREAM_PARSER,
    ),
    d(
        "sk_skb/stream_verdict",
        K::SkSkb,
        sys::BPF_PROG_TYPE_SK_SKB,
        sys::BPF_SK_SKB_STREAM_VERDICT,
    ),
    d("sk_skb", K::SkSkb, sys::BPF_PROG_TYPE_SK_SKB, 0),
    d(
        "sk_msg",
        K::SkMsg,
        sys::BPF_PROG_TYPE_SK_MSG,
        sys::BPF_SK_MSG_VERDICT,
    ),
    d(
        "sk_lookup",
        K::SkLookup,
        sys::BPF_PROG_TYPE_SK_LOOKUP,
        sys::BPF_SK_LOOKUP,
    ),
    d(
        "flow_dissector",
        K::FlowDissector,
        sys::BPF_PROG_TYPE_FLOW_DISSECTOR,
        sys::BPF_FLOW_DISSECTOR,
    ),
    d("lwt_in", K::Lwt, sys::BPF_PROG_TYPE_LWT_IN, 0),
    d("lwt_out", K::Lwt, sys::BPF_PROG_TYPE_LWT_OUT, 0),
    d("lwt_xmit", K::Lwt, sys::BPF_PROG_TYPE_LWT_XMIT, 0),
    d("lwt_seg6local", K::Lwt, sys::BPF_PROG_TYPE_LWT_SEG6LOCAL, 0),
    ds("syscall", K::Syscall, sys::BPF_PROG_TYPE_SYSCALL, 0),
    d("struct_ops", K::StructOps, sys::BPF_PROG_TYPE_STRUCT_OPS, 0),
    d(
        "netfilter",
        K::Netfilter,
        sys::BPF_PROG_TYPE_NETFILTER,
        sys::BPF_NETFILTER,
    ),
];

/// Matches a section name against libbpf's conventions: a definition `name` matches the section
/// `name` itself and `name/anything`. Unknown executable sections give [`ProgramKind::Unknown`].
pub fn parse_section(section: &str) -> SectionInfo {
    // Prefer the longest matching definition so that `cgroup_skb/ingress` wins over a shorter one.
    let def = DEFS
        .iter()
        .filter(|d| {
            section == d.name
                || (section.len() > d.name.len()
                    && section.starts_with(d.name)
                    && section.as_bytes()[d.name.len()] == b'/')
        })
        .max_by_key(|d| d.name.len());
    let Some(def) = def else {
        return SectionInfo {
            kind: ProgramKind::Unknown,
            kernel_prog_type: None,
            expected_attach_type: 0,
            prog_flags: 0,
            attach: AttachTarget::Other(section.to_string()),
        };
    };
    let rest = section
        .get(def.name.len()..)
        .and_then(|r| r.strip_prefix('/'))
        .unwrap_or("");
    let sleepable = def.flags & sys::BPF_F_SLEEPABLE != 0;
    let attach = parse_attach(def.kind, def.name, rest, sleepable);
    SectionInfo {
        kind: def.kind,
        kernel_prog_type: Some(def.prog_type),
        expected_attach_type: def.attach_type,
        prog_flags: def.flags,
        attach,
    }
}

fn parse_attach(kind: ProgramKind, def_name: &str, rest: &str, sleepable: bool) -> AttachTarget {
    if rest.is_empty() {
        return AttachTarget::None;
    }
    match kind {
        K::Uprobe | K::Uretprobe | K::UprobeMulti => {
            // libbpf: `PATH:FUNC[+OFF]`, the path runs to the first ':'.
            let retprobe = kind == K::Uretprobe || def_name.starts_with("uret");
            let (path, func) = match rest.split_once(':') {
                Some((p, f)) => (Some(p.to_string()), f),
                None => (Some(rest.to_string()), ""),
            };
            let (symbol, offset) = parse_func_offset(func);
            AttachTarget::Uprobe {
                path,
                symbol,
                offset,
                retprobe,
                sleepable,
            }
        }
        K::Usdt => {
            let mut parts = rest.splitn(3, ':');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(path), Some(provider), Some(name)) => AttachTarget::Usdt {
                    path: path.to_string(),
                    provider: provider.to_string(),
                    name: name.to_string(),
                },
                _ => AttachTarget::Other(rest.to_string()),
            }
        }
        K::Kprobe | K::Kretprobe | K::KprobeMulti | K::Ksyscall => {
            let (symbol, offset) = parse_func_offset(rest);
            AttachTarget::Kprobe {
                symbol,
                offset,
                retprobe: def_name.starts_with("kret"),
            }
        }
        K::Tracepoint => match rest.split_once('/') {
            Some((category, name)) if !category.is_empty() && !name.is_empty() => {
                AttachTarget::Tracepoint {
                    category: category.to_string(),
                    name: name.to_string(),
                }
            }
            _ => AttachTarget::Other(rest.to_string()),
        },
        K::RawTracepoint | K::TpBtf => AttachTarget::RawTracepoint {
            name: rest.to_string(),
        },
        K::Fentry | K::Fexit | K::FmodRet | K::Lsm | K::Iter => AttachTarget::BtfTarget {
            name: rest.to_string(),
        },
        _ => AttachTarget::Other(rest.to_string()),
    }
}

/// `FUNC`, `FUNC+OFF` (decimal or 0x hex) or a bare address/offset.
fn parse_func_offset(s: &str) -> (Option<String>, u64) {
    if s.is_empty() {
        return (None, 0);
    }
    if let Some(n) = parse_num(s) {
        return (None, n);
    }
    match s.rsplit_once('+') {
        Some((f, off)) => match parse_num(off) {
            Some(n) => (Some(f.to_string()), n),
            None => (Some(s.to_string()), 0),
        },
        None => (Some(s.to_string()), 0),
    }
}

fn parse_num(s: &str) -> Option<u64> {
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if s.bytes().all(|b| b.is_ascii_digit()) && !s.is_empty() {
        s.parse().ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uprobe_forms() {
        let s = parse_section("uprobe//usr/bin/victim:target_fn+0x10");
        assert_eq!(s.kind, ProgramKind::Uprobe);
        assert_eq!(s.kernel_prog_type, Some(sys::BPF_PROG_TYPE_KPROBE));
        assert_eq!(
            s.attach,
            AttachTarget::Uprobe {
                path: Some("/usr/bin/victim".into()),
                symbol: Some("target_fn".into()),
                offset: 16,
                retprobe: false,
                sleepable: false
            }
        );
        let s = parse_section("uretprobe.s/libc.so.6:0x1234");
        assert_eq!(
            s.attach,
            AttachTarget::Uprobe {
                path: Some("libc.so.6".into()),
                symbol: None,
                offset: 0x1234,
                retprobe: true,
                sleepable: true
            }
        );
        assert_eq!(parse_section("uprobe").attach, AttachTarget::None);
        assert_eq!(parse_section("uprobe.s").prog_flags, sys::BPF_F_SLEEPABLE);
    }

    #[test]
    fn other_forms() {
        let s = parse_section("tp/syscalls/sys_enter_write");
        assert_eq!(
            s.attach,
            AttachTarget::Tracepoint {
                category: "syscalls".into(),
                name: "sys_enter_write".into()
            }
        );
        assert_eq!(
            parse_section("cgroup_skb/egress").expected_attach_type,
            sys::BPF_CGROUP_INET_EGRESS
        );
        assert_eq!(parse_section("syscall").prog_flags, sys::BPF_F_SLEEPABLE);
        assert_eq!(parse_section("xdpfoo").kind, ProgramKind::Unknown);
        assert_eq!(
            parse_section("kretprobe/do_exit").attach,
            AttachTarget::Kprobe {
                symbol: Some("do_exit".into()),
                offset: 0,
                retprobe: true
            }
        );
    }
}
