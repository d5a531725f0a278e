//! An error with its whole `source()` chain on one line, written once for every crate: the CLI's
//! warnings, the agent's status lines, test failure messages and the examples all print errors
//! as text, and the errno a library kept as a source (say, EACCES on a map) must stay on the line.

use std::error::Error;
use std::fmt;

/// Displays an error and each of its sources, `: `-separated (`outer: middle: inner`), without
/// allocating: `eprintln!("skipping {name}: {}", ErrorChain(&e))`.
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a dyn Error);

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// An error with its sources, `: `-separated (`outer: middle: inner`); see [`ErrorChain`] to
/// format one without allocating.
pub fn error_chain(e: &dyn Error) -> String {
    ErrorChain(e).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error whose `Display` is its name alone, with an optional source.
    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<dyn Error + 'static>>);

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for Layer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref()
        }
    }

    #[test]
    fn every_source_is_on_the_line() {
        let inner = std::io::Error::from_raw_os_error(libc::EACCES);
        let inner_text = inner.to_string();
        let e = Layer(
            "outer",
            Some(Box::new(Layer("middle", Some(Box::new(inner))))),
        );
        let expected = format!("outer: middle: {inner_text}");
        assert_eq!(error_chain(&e), expected);
        assert_eq!(ErrorChain(&e).to_string(), expected);
    }

    #[test]
    fn an_error_without_source_is_its_display() {
        let e = Layer("alone", None);
        assert_eq!(error_chain(&e), "alone");
        assert_eq!(format!("{}", ErrorChain(&e)), "alone");
    }
}
