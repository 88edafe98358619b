//! The one declaration of every counter set the engine exports.
//!
//! Stats cross three layers: the engine's Rust struct, a `#[repr(C)]`
//! struct in `meshvpn-ffi` (what cbindgen writes into `include/meshvpn.h`)
//! and a Go struct in `bindings/go`. Declared by hand in each, they drifted
//! (C and Go lacked `buffer_limit_drops` and `udp_send_dropped`). So each
//! stats struct and the drop reasons are declared once, with `stats_struct!` and
//! `stats_reasons!`, which emit the Rust type together with a
//! machine-readable field list ([`StatField`]: name and doc, in order).
//! `meshvpn-ffi` converts with an exhaustive destructuring pattern (a Rust
//! field the C struct lacks does not compile) and its parity test reads the
//! header and the Go source against these lists (a field missing or extra
//! in C or Go fails `cargo test -p meshvpn-ffi`). The C and Go structs are
//! checked, not generated: cbindgen reads source text and cannot see macro
//! output, and the Go package stays buildable with `go build` alone.
//!
//! No I/O, no dependencies: every layer may declare its stats here.

/// One field of a stats struct (or one reason of a reason enum), as the
/// parity test in `meshvpn-ffi` checks it against C and Go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatField {
    /// The Rust field name (for a reason: its text name, as
    /// `DropReason::name` returns it).
    pub name: &'static str,
    /// The field's rustdoc, one line per `///` line; never empty.
    pub doc: &'static str,
}

/// Declares a stats struct and its field list, `Self::FIELDS`.
///
/// Every field needs a doc comment (the macro refuses an undocumented
/// one), and takes no other attribute.
///
/// `stats_struct! { @counters ... }` declares a struct of `u64` counters
/// only (any other type does not compile) and adds `counters()`: the values
/// in the order of `FIELDS`, so a metrics page or a status listing is
/// written from the one declaration (names, docs and values) too.
macro_rules! stats_struct {
    (
        @counters
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $(
                $(#[doc = $doc:literal])+
                $fvis:vis $field:ident : u64
            ),* $(,)?
        }
    ) => {
        $crate::stats::stats_struct! {
            $(#[$meta])*
            $vis struct $name {
                $( $(#[doc = $doc])+ $fvis $field: u64, )*
            }
        }

        impl $name {
            /// Every counter's value, in the order of `Self::FIELDS`.
            pub fn counters(&self) -> [u64; [$(stringify!($field)),*].len()] {
                [$(self.$field),*]
            }
        }
    };
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $(
                $(#[doc = $doc:literal])+
                $fvis:vis $field:ident : $ty:ty
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis struct $name {
            $( $(#[doc = $doc])+ $fvis $field: $ty, )*
        }

        impl $name {
            /// Every field in declaration order, for the C and Go parity
            /// check (see [`crate::stats`]).
            pub const FIELDS: &'static [$crate::stats::StatField] = &[
                $( $crate::stats::StatField {
                    name: stringify!($field),
                    doc: concat!($($doc, "\n"),+),
                }, )*
            ];
        }
    };
}
pub(crate) use stats_struct;

/// Declares a fieldless enum of counter indices: the enum, `Self::ALL` (in
/// order: `reason as usize` is the index), `name()` (the text name C and
/// Go use) and `Self::FIELDS` (names and docs for the parity check).
macro_rules! stats_reasons {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $(
                $(#[doc = $doc:literal])+
                $variant:ident = $text:literal
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $( $(#[doc = $doc])+ $variant, )*
        }

        impl $name {
            /// Every value in declaration order; `value as usize` is its
            /// index here.
            pub const ALL: [$name; [$(stringify!($variant)),*].len()] = [$($name::$variant),*];

            /// Every value's name and doc, in the order of `ALL` (see
            /// [`crate::stats`]).
            pub const FIELDS: &'static [$crate::stats::StatField] = &[
                $( $crate::stats::StatField {
                    name: $text,
                    doc: concat!($($doc, "\n"),+),
                }, )*
            ];

            /// The stable text name (`snake_case`), the same in C
            /// (`MESHVPN_DROP_` + upper case) and Go (`String()`).
            pub fn name(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )*
                }
            }
        }
    };
}
pub(crate) use stats_reasons;

#[cfg(test)]
mod tests {
    stats_struct! {
        #[derive(Default)]
        pub struct Example {
            /// First.
            /// Second line.
            pub a: u64,
            /// B.
            pub b: usize,
        }
    }

    stats_struct! {
        @counters
        #[derive(Default)]
        pub struct Counters {
            /// X.
            pub x: u64,
            /// Y.
            pub y: u64,
        }
    }

    #[test]
    fn counters_follow_the_fields() {
        let c = Counters { x: 3, y: 5 };
        let named: Vec<_> = Counters::FIELDS
            .iter()
            .map(|f| f.name)
            .zip(c.counters())
            .collect();
        assert_eq!(named, [("x", 3), ("y", 5)]);
        assert_eq!(Counters::default().counters(), [0, 0]);
    }

    stats_reasons! {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Why {
            /// One.
            One = "one",
            /// Two.
            Two = "two_words",
        }
    }

    #[test]
    fn fields_follow_the_declaration() {
        let names: Vec<_> = Example::FIELDS.iter().map(|f| f.name).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(Example::FIELDS[0].doc, " First.\n Second line.\n");
        let _ = Example::default().a + Example::default().b as u64;
    }

    #[test]
    fn reasons_are_indexed_and_named_in_order() {
        assert_eq!(Why::ALL, [Why::One, Why::Two]);
        for (i, r) in Why::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert_eq!(Why::FIELDS[i].name, r.name());
        }
        assert_eq!(Why::Two.name(), "two_words");
    }
}
