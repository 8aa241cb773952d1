//! Removing secrets from text that is shown or stored: URLs and DSNs with
//! passwords in them (state locations, repository URLs, database DSNs).
//!
//! Redaction errs on the side of hiding: anything that could be the password
//! part of a URL's authority is replaced, even when the URL is malformed
//! (`postgres://u:s3/cr3t@host`, a password with `#` or `?` in it).

/// `text` with any password replaced by `***`, as a URL
/// (`postgres://user:***@host/db`, `?password=***`) or as a key=value DSN
/// (`host=h password=*** dbname=d`).
pub fn redact(text: &str) -> String {
    match text.split_once("://") {
        Some((scheme, rest)) if !scheme.is_empty() && !scheme.contains(char::is_whitespace) => {
            format!("{scheme}://{}", redact_after_scheme(rest))
        }
        _ => redact_dsn(text),
    }
}

fn redact_after_scheme(rest: &str) -> String {
    // The authority ends at the last `@` when the part before it holds a
    // `:` (user:password); a password may contain `/`, `?`, `#` or `@`
    // unescaped, so no earlier delimiter can be trusted to end it.
    if let Some(at) = rest.rfind('@') {
        let (cred, host) = rest.split_at(at);
        if let Some((user, _)) = cred.split_once(':')
            && !user.contains(['/', '?', '#'])
        {
            return format!("{user}:***{}", redact_query(host));
        }
    }
    redact_query(rest)
}

/// Replaces the values of query parameters whose name mentions a password
/// or secret.
fn redact_query(s: &str) -> String {
    let Some((head, query)) = s.split_once('?') else {
        return s.to_owned();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let parts: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if secret_key(k) => format!("{k}=***"),
            _ => kv.to_owned(),
        })
        .collect();
    let mut out = format!("{head}?{}", parts.join("&"));
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

fn secret_key(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    let k = percent_encoding::percent_decode_str(&k).decode_utf8_lossy();
    ["password", "passwd", "pwd", "secret", "token"]
        .iter()
        .any(|s| k.contains(s))
}

/// `key=value` pairs (libpq's and ODBC's DSNs, spaces allowed around `=`);
/// values may be quoted with `'`.
fn redact_dsn(text: &str) -> String {
    static SECRET: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(
            r"(?i)\b([a-z_]*(?:password|passwd|pwd|secret|token)[a-z_]*)(\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s;]*)",
        )
        .unwrap_or_else(|e| panic!("the DSN pattern does not compile: {e}"))
    });
    SECRET.replace_all(text, "$1$2***").into_owned()
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_hidden_wherever_they_are() {
        let cases = [
            ("postgres://u:p@ss@h:5/db", "postgres://u:***@h:5/db"),
            ("postgres://u:s3/cr3t@host/db", "postgres://u:***@host/db"),
            ("postgres://u:a#b?c@host/db", "postgres://u:***@host/db"),
            (
                "mysql://h/db?user=u&password=x",
                "mysql://h/db?user=u&password=***",
            ),
            (
                "mysql://h/db?user=u&PassWord=x#f",
                "mysql://h/db?user=u&PassWord=***#f",
            ),
            ("http://h/x?y=@z", "http://h/x?y=@z"),
            ("sqlite:///a/b.db", "sqlite:///a/b.db"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            (
                "host=h user=u password=s3cr3t dbname=d",
                "host=h user=u password=*** dbname=d",
            ),
            (
                "host=h password='a b\\' c' dbname=d",
                "host=h password=*** dbname=d",
            ),
            ("Server=h;Pwd=x;Database=d", "Server=h;Pwd=***;Database=d"),
        ];
        for (input, want) in cases {
            assert_eq!(redact(input), want, "{input}");
        }
    }

    #[test]
    fn no_secret_survives_in_any_case() {
        for input in [
            "postgres://u:s3cr3t@h/db",
            "postgres://u:s3cr3t/x@h/db",
            "postgres://h/db?password=s3cr3t",
            "password=s3cr3t",
            "user=u password = s3cr3t",
        ] {
            let out = redact(input);
            assert!(!out.contains("s3cr3t"), "{input} -> {out}");
        }
    }
}
