//! An aborted JIT run (a failing helper deep in a callback) hands the caller back its
//! callee-saved registers: the outer entry restores them from the first function's frame.

use bpftime_runtime::vm::{
    asm::assemble, interpret, CallContext, HelperError, Helpers, InterpOptions, MemoryMap, Program,
};

/// Helper 100: runs the callback in r1 and ignores its failure; everything else is unknown.
struct Swallow;

impl Helpers for Swallow {
    fn call(
        &mut self,
        id: u32,
        a: [u64; 5],
        ctx: &mut CallContext<'_, '_>,
    ) -> Result<u64, HelperError> {
        match id {
            100 => {
                let r = ctx.call_function(self, a[0], [0; 5]);
                assert!(r.is_err(), "{r:?}");
                Ok(0)
            }
            _ => Err(HelperError::Unknown(id)),
        }
    }
}

#[test]
fn callee_saved_registers_survive_an_aborted_callback() {
    // The callback clobbers r6-r9 and fails two calls deep; the program checks that its own
    // r6-r9 are intact after the helper returned.
    let src = "mov %r6, 0x66\nmov %r7, 0x77\nmov %r8, 0x88\nmov %r9, 0x99\n\
               lddw %r1, cb\ncall 100\n\
               jne %r6, 0x66, bad\njne %r7, 0x77, bad\njne %r8, 0x88, bad\n\
               jne %r9, 0x99, bad\nmov %r0, 1\nexit\nbad:\nmov %r0, 2\nexit\n\
               cb:\nmov %r6, 1\nmov %r7, 2\nmov %r8, 3\nmov %r9, 4\ncall local deeper\nexit\n\
               deeper:\nmov %r6, 5\nmov %r7, 6\nmov %r8, 7\nmov %r9, 8\ncall 999\nexit\n";
    let p = Program::new(assemble(src).expect("assemble")).expect("load");
    for _ in 0..100 {
        let mut mem = MemoryMap::new();
        // SAFETY: the program only touches its own stack.
        let jit = unsafe { p.jit().unwrap().run([0; 5], &mut mem, &mut Swallow) };
        assert_eq!(jit, Ok(1));
    }
    let mut mem = MemoryMap::new();
    let interp = interpret(&p, [0; 5], &mut mem, &mut Swallow, InterpOptions::default());
    assert_eq!(interp, Ok(1));
}
