//! Syntax of domain names and patterns, shared by the gateway's
//! configuration checks and the Envoy module: `example.com` (exact),
//! `*.example.com` (any name below example.com, not example.com itself) or
//! `*` (every name: all DNS of the gated cgroup gets VIPs).

/// Lower-cases a DNS name and drops one trailing dot: the form names are
/// compared and stored in.
pub fn normalize_name(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Checks a host name (no wildcard) and returns it normalised.
pub fn validate_name(name: &str) -> Result<String, String> {
    let normalized = normalize_name(name);
    if normalized.is_empty() {
        return Err("empty name".into());
    }
    if normalized.len() > 253 {
        return Err(format!("{name:?} is longer than 253 characters"));
    }
    for label in normalized.split('.') {
        if label.is_empty() {
            return Err(format!("{name:?} has an empty label"));
        }
        if label.len() > 63 {
            return Err(format!("{name:?} has a label longer than 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "{name:?} may only contain letters, digits, '-', '_' and '.' (a wildcard only as a leading \"*.\")"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("{name:?} has a label starting or ending with '-'"));
        }
    }
    Ok(normalized)
}

/// Checks a pattern and returns it normalised (`*.` kept for wildcards).
pub fn validate_pattern(pattern: &str) -> Result<String, String> {
    match pattern.strip_prefix("*.") {
        Some(suffix) => Ok(format!("*.{}", validate_name(suffix)?)),
        None if pattern == "*" => Ok("*".into()),
        None => validate_name(pattern),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_normalised_or_rejected() {
        assert_eq!(validate_pattern("*.AWS.com.").as_deref(), Ok("*.aws.com"));
        assert_eq!(
            validate_pattern("Example.COM").as_deref(),
            Ok("example.com")
        );
        assert_eq!(validate_pattern("*").as_deref(), Ok("*"));
        for bad in [
            "",
            "**",
            "*.*.aws.com",
            "a*.aws.com",
            "exa mple.com",
            "a..b",
            "-a.com",
            "*.",
        ] {
            assert!(validate_pattern(bad).is_err(), "{bad:?} accepted");
        }
        let long_label = "a".repeat(64);
        assert!(validate_pattern(&format!("{long_label}.com")).is_err());
    }
}
