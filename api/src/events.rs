//! Event kinds.

/// Normalises an event kind: each dot segment is split at CamelCase and acronym boundaries and
/// lower-cased; empty segments are dropped (`Service.Start` → `service.start`, `WorldDiff` →
/// `world.diff`, `HTTPServer` → `http.server`).
pub fn normalize_kind(kind: &str) -> String {
    let mut words: Vec<String> = Vec::new();
    for segment in kind.split('.') {
        let chars: Vec<char> = segment.chars().collect();
        let mut word = String::new();
        for (i, &c) in chars.iter().enumerate() {
            let prev = i.checked_sub(1).map(|j| chars[j]);
            let next = chars.get(i + 1).copied();
            let boundary = c.is_uppercase()
                && prev.is_some_and(|p| {
                    p.is_lowercase()
                        || p.is_ascii_digit()
                        || (p.is_uppercase() && next.is_some_and(char::is_lowercase))
                });
            if boundary && !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
            word.extend(c.to_lowercase());
        }
        if !word.is_empty() {
            words.push(word);
        }
    }
    words.join(".")
}

#[cfg(test)]
mod tests {
    use super::normalize_kind;

    #[test]
    fn reference_examples() {
        for (input, want) in [
            ("Service.Start", "service.start"),
            ("WorldDiff", "world.diff"),
            ("HTTPServer", "http.server"),
            ("cluster.node.advertise", "cluster.node.advertise"),
            ("a..b.", "a.b"),
            ("policy.capsule.applied", "policy.capsule.applied"),
            ("task.completed", "task.completed"),
        ] {
            assert_eq!(normalize_kind(input), want, "{input}");
        }
    }
}
