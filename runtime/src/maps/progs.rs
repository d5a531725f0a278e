//! The registry of loaded programs that agents read: a fixed table of records (name, section,
//! attach target, program type, offset+len of instruction bytes in the segment).
//! The loader writes a record completely, then publishes it with a release store of its state
//! and bumps the registry generation, so an agent polling the generation sees whole records.

use std::sync::atomic::Ordering;

use super::layout::*;
use super::lock::LockGuard;
use super::{MapError, ShmObject};

/// What the loader registers.
#[derive(Debug, Clone, Copy)]
pub struct ProgramSpec<'a> {
    pub name: &'a str,
    pub section: &'a str,
    /// e.g. `/usr/bin/bash:readline` for `uprobe//usr/bin/bash:readline`.
    pub attach_target: &'a str,
    /// Kernel `BPF_PROG_TYPE_*`.
    pub prog_type: u32,
    /// Relocated instructions (8 bytes each).
    pub insns: &'a [u8],
    /// How agents must run it (see `crate::loaded`); opaque to the registry.
    pub run_flags: u64,
}

/// A registered program as agents read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramInfo {
    pub index: u32,
    pub name: String,
    pub section: String,
    pub attach_target: String,
    pub prog_type: u32,
    pub insns: Vec<u8>,
    pub run_flags: u64,
}

impl ShmObject {
    fn prog_record_ptr(&self, i: u32) -> *mut ProgRecord {
        let h = self.header();
        debug_assert!(i < h.max_programs);
        self.inner
            .mapping
            .base()
            .wrapping_add(h.progs_off as usize + i as usize * std::mem::size_of::<ProgRecord>())
            as *mut ProgRecord
    }

    fn prog_record(&self, i: u32) -> &ProgRecord {
        // SAFETY: i < max_programs; the table lies inside the segment (checked at creation,
        // and total_size is verified on open).
        unsafe { &*self.prog_record_ptr(i) }
    }

    /// Adds a program; returns its index (what PROG_ARRAY slots hold).
    pub fn register_program(&self, spec: &ProgramSpec<'_>) -> Result<u32, MapError> {
        let h = self.header();
        let fail = |reason: String| MapError::Registry {
            object: self.inner.object.clone(),
            reason,
        };
        for (what, s, cap) in [
            ("name", spec.name, NAME_LEN),
            ("section", spec.section, SECTION_LEN),
            ("attach target", spec.attach_target, ATTACH_LEN),
        ] {
            if s.len() >= cap {
                return Err(fail(format!(
                    "program {}: {what} longer than {} bytes",
                    spec.name,
                    cap - 1
                )));
            }
        }
        let _g = LockGuard::new(&h.prog_lock);
        let Some(idx) = (0..h.max_programs)
            .find(|&i| self.prog_record(i).state.load(Ordering::Acquire) == PROG_FREE)
        else {
            return Err(fail(format!(
                "program {}: registry full ({} programs)",
                spec.name, h.max_programs
            )));
        };
        let used = h.prog_bytes_used.load(Ordering::Relaxed);
        let len = spec.insns.len() as u64;
        let off = round_up(used, 8);
        if off + len > h.prog_bytes_cap {
            return Err(fail(format!(
                "program {}: {} instruction bytes exceed the remaining {} of the registry",
                spec.name,
                len,
                h.prog_bytes_cap.saturating_sub(off)
            )));
        }
        let abs = h.prog_bytes_off + off;
        let base = self.inner.mapping.base();
        // SAFETY: [abs, abs+len) lies in the program byte area, which we own under prog_lock;
        // the record at idx is free, so no agent reads it until we publish its state.
        unsafe {
            std::ptr::copy_nonoverlapping(
                spec.insns.as_ptr(),
                base.add(abs as usize),
                spec.insns.len(),
            );
            let r = self.prog_record_ptr(idx);
            (*r).prog_type = spec.prog_type;
            (*r).insn_off = abs;
            (*r).insn_len = len;
            (*r).run_flags = spec.run_flags;
            put_str(&mut (*r).name, spec.name);
            put_str(&mut (*r).section, spec.section);
            put_str(&mut (*r).attach, spec.attach_target);
        }
        h.prog_bytes_used.store(off + len, Ordering::Relaxed);
        self.prog_record(idx)
            .state
            .store(PROG_VALID, Ordering::Release);
        h.prog_count.fetch_add(1, Ordering::Relaxed);
        h.progs_generation.fetch_add(1, Ordering::Release);
        Ok(idx)
    }

    /// Removes a program from the registry (its bytes are not reused).
    pub fn unregister_program(&self, index: u32) -> bool {
        let h = self.header();
        if index >= h.max_programs {
            return false;
        }
        let _g = LockGuard::new(&h.prog_lock);
        let r = self.prog_record(index);
        if r.state.swap(PROG_FREE, Ordering::AcqRel) != PROG_VALID {
            return false;
        }
        h.prog_count.fetch_sub(1, Ordering::Relaxed);
        h.progs_generation.fetch_add(1, Ordering::Release);
        true
    }

    /// Bumped on every registry change; agents poll it.
    pub fn programs_generation(&self) -> u64 {
        self.header().progs_generation.load(Ordering::Acquire)
    }

    /// Every registered program.
    pub fn programs(&self) -> Vec<ProgramInfo> {
        let h = self.header();
        (0..h.max_programs)
            .filter_map(|i| self.program(i))
            .collect()
    }

    pub fn program(&self, index: u32) -> Option<ProgramInfo> {
        let h = self.header();
        if index >= h.max_programs {
            return None;
        }
        let r = self.prog_record(index);
        if r.state.load(Ordering::Acquire) != PROG_VALID {
            return None;
        }
        let end = r.insn_off.checked_add(r.insn_len)?;
        if r.insn_off < h.prog_bytes_off || end > h.prog_bytes_off + h.prog_bytes_cap {
            return None;
        }
        let mut insns = vec![0u8; r.insn_len as usize];
        // SAFETY: range checked against the program byte area above.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.inner.mapping.base().add(r.insn_off as usize),
                insns.as_mut_ptr(),
                insns.len(),
            )
        };
        Some(ProgramInfo {
            index,
            name: get_str(&r.name),
            section: get_str(&r.section),
            attach_target: get_str(&r.attach),
            prog_type: r.prog_type,
            insns,
            run_flags: r.run_flags,
        })
    }
}
