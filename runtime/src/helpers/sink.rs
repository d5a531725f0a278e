//! Where `bpf_trace_printk` / `bpf_trace_vprintk` lines go.

use std::sync::{Arc, Mutex};

use super::TRACE_MAP_NAME;
use crate::maps::{MapError, MapHandle, RingBuf, ShmObject};

/// Where `bpf_trace_printk` lines go.
pub trait TraceSink: Send {
    /// One formatted line (without its trailing newline).
    fn emit(&mut self, line: &[u8]);
}

impl<F: FnMut(&[u8]) + Send> TraceSink for F {
    fn emit(&mut self, line: &[u8]) {
        self(line)
    }
}

/// Discards lines (the default).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullTraceSink;

impl TraceSink for NullTraceSink {
    fn emit(&mut self, _line: &[u8]) {}
}

/// Collects lines in memory (shared: clone it before handing it to the helpers).
#[derive(Debug, Default, Clone)]
pub struct MemoryTraceSink(Arc<Mutex<Vec<Vec<u8>>>>);

impl MemoryTraceSink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// Lines so far, lossily decoded.
    pub fn lines(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect()
    }

    /// Remove and return the lines so far.
    pub fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl TraceSink for MemoryTraceSink {
    fn emit(&mut self, line: &[u8]) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line.to_vec());
    }
}

/// Writes each line as one record into a RINGBUF map (normally [`TRACE_MAP_NAME`]), where a
/// consumer in any process (the CLI's `load`) reads them. A full ring drops the line (counted
/// in the map's `lost` counter), as the kernel's trace buffer overwrites.
#[derive(Debug, Clone)]
pub struct RingbufTraceSink(RingBuf);

impl RingbufTraceSink {
    /// Sink into `map`, which must be a RINGBUF.
    pub fn new(map: MapHandle) -> Result<Self, MapError> {
        Ok(Self(RingBuf::try_from(map)?))
    }

    /// Sink into the object's [`TRACE_MAP_NAME`] map.
    pub fn from_object(obj: &ShmObject) -> Result<Self, MapError> {
        Self::new(obj.map(TRACE_MAP_NAME)?)
    }
}

impl TraceSink for RingbufTraceSink {
    fn emit(&mut self, line: &[u8]) {
        // A full ring loses the line; the map counts it.
        let _ = self.0.output(line, 0);
    }
}
