//! Domain patterns and the most-specific-wins match.
//!
//! A pattern is exact (`example.com`), a wildcard (`*.aws.com`: any name
//! with at least one more label, not `aws.com` itself) or the catch-all
//! `*`. Names compare case-insensitively and a trailing dot is ignored.
//! The best match is independent of the configured order: an exact
//! pattern beats every wildcard, a longer wildcard suffix beats a shorter
//! one, and `*` comes last.

use std::collections::{BTreeMap, HashMap};

/// Normalises a domain name for matching and storage: ASCII lower case,
/// no trailing dot, labels of 1–63 letters, digits, `-` or `_` (the rules of
/// `gateway_common::pattern`, shared with the gateway's configuration
/// checks). Returns `None` for anything else: such names are never matched,
/// so they can never reach a filter state or a CONNECT request line.
pub fn normalize(name: &str) -> Option<String> {
    gateway_common::pattern::validate_name(name).ok()
}

/// A parsed pattern.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// Matches exactly this (normalised) name.
    Exact(String),
    /// Matches names strictly below this (normalised) suffix.
    Wildcard(String),
    /// Matches every name (`*`).
    CatchAll,
}

impl Pattern {
    /// Parses `*`, `*.suffix` or an exact name.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "*" {
            return Ok(Pattern::CatchAll);
        }
        if let Some(suffix) = text.strip_prefix("*.") {
            return normalize(suffix).map(Pattern::Wildcard).ok_or_else(|| {
                format!("{text:?} is not a valid wildcard pattern (`*.` then a domain name)")
            });
        }
        normalize(text).map(Pattern::Exact).ok_or_else(|| {
            format!("{text:?} is not a valid domain name or pattern (labels of letters, digits, `-`, `_`; `*` only as the whole first label)")
        })
    }

    /// The zone the pattern stands for: what negative answers carry in the
    /// SOA owner name (`aws.com` for `*.aws.com`, the root for `*`).
    pub fn zone(&self) -> &str {
        match self {
            Pattern::Exact(name) | Pattern::Wildcard(name) => name,
            Pattern::CatchAll => "",
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Exact(name) => f.write_str(name),
            Pattern::Wildcard(suffix) => write!(f, "*.{suffix}"),
            Pattern::CatchAll => f.write_str("*"),
        }
    }
}

/// One configured domain: its pattern and the metadata it exposes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainRule {
    /// The pattern.
    pub pattern: Pattern,
    /// String key-value pairs exposed as filter state.
    pub metadata: BTreeMap<String, String>,
}

/// Every configured domain, indexed for the most-specific match.
#[derive(Clone, Debug, Default)]
pub struct PatternSet {
    rules: Vec<DomainRule>,
    /// Per rule: (filter-state key, value) of each metadata entry, built
    /// once so that a connection formats no key.
    state: Vec<Vec<(String, String)>>,
    exact: HashMap<String, usize>,
    wildcard: HashMap<String, usize>,
    catch_all: Option<usize>,
}

impl PatternSet {
    /// Indexes `rules`; a pattern given twice is an error naming both
    /// positions.
    pub fn new(rules: Vec<DomainRule>) -> Result<Self, String> {
        let mut set = PatternSet {
            rules: Vec::new(),
            ..Default::default()
        };
        for (i, rule) in rules.iter().enumerate() {
            let previous = match &rule.pattern {
                Pattern::Exact(name) => set.exact.insert(name.clone(), i),
                Pattern::Wildcard(suffix) => set.wildcard.insert(suffix.clone(), i),
                Pattern::CatchAll => set.catch_all.replace(i),
            };
            if let Some(j) = previous {
                return Err(format!(
                    "domains[{i}].domain: pattern {} is already given by domains[{j}]",
                    rule.pattern
                ));
            }
        }
        set.state = rules
            .iter()
            .map(|rule| {
                rule.metadata
                    .iter()
                    .map(|(k, v)| {
                        (
                            format!("{}{k}", gateway_common::contract::METADATA_KEY_PREFIX),
                            v.clone(),
                        )
                    })
                    .collect()
            })
            .collect();
        set.rules = rules;
        Ok(set)
    }

    /// The configured rules, in configuration order.
    pub fn rules(&self) -> &[DomainRule] {
        &self.rules
    }

    /// The most specific rule matching the normalised `name`.
    pub fn best_match(&self, name: &str) -> Option<&DomainRule> {
        self.best_index(name).and_then(|i| self.rules.get(i))
    }

    /// The most specific rule matching `name` with its metadata as
    /// (filter-state key, value) pairs.
    pub fn best_match_state(&self, name: &str) -> Option<(&DomainRule, &[(String, String)])> {
        let i = self.best_index(name)?;
        Some((self.rules.get(i)?, self.state.get(i)?.as_slice()))
    }

    fn best_index(&self, name: &str) -> Option<usize> {
        if let Some(&i) = self.exact.get(name) {
            return Some(i);
        }
        // Proper suffixes from the longest (most specific) to the shortest.
        let mut rest = name;
        while let Some(dot) = rest.find('.') {
            rest = &rest[dot + 1..];
            if let Some(&i) = self.wildcard.get(rest) {
                return Some(i);
            }
        }
        self.catch_all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(patterns: &[&str]) -> PatternSet {
        PatternSet::new(
            patterns
                .iter()
                .map(|p| DomainRule {
                    pattern: Pattern::parse(p).unwrap(),
                    metadata: BTreeMap::from([("id".to_owned(), (*p).to_owned())]),
                })
                .collect(),
        )
        .unwrap()
    }

    fn best(set: &PatternSet, name: &str) -> Option<String> {
        let name = normalize(name)?;
        set.best_match(&name).map(|r| r.metadata["id"].clone())
    }

    #[test]
    fn exact_matches_only_itself() {
        let s = set(&["example.com"]);
        assert_eq!(best(&s, "example.com").as_deref(), Some("example.com"));
        assert_eq!(best(&s, "www.example.com"), None);
        assert_eq!(best(&s, "example.org"), None);
        assert_eq!(best(&s, "xexample.com"), None);
    }

    #[test]
    fn wildcard_matches_subdomains_at_any_depth_but_not_the_apex() {
        let s = set(&["*.aws.com"]);
        assert_eq!(best(&s, "bucket-1.aws.com").as_deref(), Some("*.aws.com"));
        assert_eq!(best(&s, "sub.api.aws.com").as_deref(), Some("*.aws.com"));
        assert_eq!(best(&s, "aws.com"), None);
        assert_eq!(best(&s, "notaws.com"), None);
        assert_eq!(best(&s, "aws.com.evil.org"), None);
    }

    #[test]
    fn case_and_trailing_dot_are_ignored() {
        let s = set(&["Example.COM", "*.AWS.com."]);
        assert_eq!(best(&s, "EXAMPLE.com.").as_deref(), Some("Example.COM"));
        assert_eq!(best(&s, "Bucket.Aws.Com").as_deref(), Some("*.AWS.com."));
    }

    #[test]
    fn most_specific_wins_regardless_of_order() {
        for order in [
            ["*", "*.com", "*.aws.com", "*.s3.aws.com", "one.s3.aws.com"],
            ["one.s3.aws.com", "*.s3.aws.com", "*.aws.com", "*.com", "*"],
            ["*.aws.com", "one.s3.aws.com", "*", "*.s3.aws.com", "*.com"],
        ] {
            let s = set(&order);
            assert_eq!(
                best(&s, "one.s3.aws.com").as_deref(),
                Some("one.s3.aws.com")
            );
            assert_eq!(best(&s, "two.s3.aws.com").as_deref(), Some("*.s3.aws.com"));
            assert_eq!(best(&s, "s3.aws.com").as_deref(), Some("*.aws.com"));
            assert_eq!(best(&s, "aws.com").as_deref(), Some("*.com"));
            assert_eq!(best(&s, "example.org").as_deref(), Some("*"));
        }
    }

    #[test]
    fn invalid_names_never_match() {
        let s = set(&["*"]);
        assert_eq!(best(&s, "bad name.com"), None);
        assert_eq!(best(&s, "a..b"), None);
        assert_eq!(best(&s, "evil\r\n.com"), None);
        assert_eq!(best(&s, ""), None);
        assert_eq!(best(&s, &format!("{}.com", "a".repeat(64))), None);
        assert_eq!(best(&s, &["a"; 130].join(".")), None);
    }

    #[test]
    fn bad_patterns_and_duplicates_are_rejected() {
        assert!(Pattern::parse("**.com").is_err());
        assert!(Pattern::parse("a.*.com").is_err());
        assert!(Pattern::parse("*.").is_err());
        assert!(Pattern::parse("").is_err());
        let dup = PatternSet::new(vec![
            DomainRule {
                pattern: Pattern::parse("a.com").unwrap(),
                metadata: BTreeMap::new(),
            },
            DomainRule {
                pattern: Pattern::parse("A.com.").unwrap(),
                metadata: BTreeMap::new(),
            },
        ]);
        assert!(dup.unwrap_err().contains("domains[1].domain"));
    }
}
