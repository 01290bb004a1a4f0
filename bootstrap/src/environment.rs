//! Variables of the environment that look meant for lq-realtime but that it does not read: a
//! misspelling (`REDIS_ULR`), a name cut short or run on (`JWT_SECRET`, `WEBHOOK_SECRET`), or an
//! `LQ_` name. Each is worth a warning at start, naming the variable it was probably meant to be.

use crate::config::VARIABLES;

/// A variable the configuration does not read, and the one it resembles (if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NearMiss {
    pub name: String,
    pub meant: Option<&'static str>,
}

impl std::fmt::Display for NearMiss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.meant {
            Some(meant) => {
                write!(f, "{} is not a variable lq-realtime reads; did you mean {meant}?", self.name)
            }
            None => {
                write!(f, "{} is not a variable lq-realtime reads (see docs/configuration.md)", self.name)
            }
        }
    }
}

/// The near misses among `names` (the environment's variable names), in their order.
pub fn near_misses(names: impl IntoIterator<Item = String>) -> Vec<NearMiss> {
    names
        .into_iter()
        .filter(|name| !VARIABLES.contains(&name.as_str()) && !is_service_link(name))
        .filter_map(|name| {
            let meant = resembled(&name);
            (meant.is_some() || name.starts_with("LQ_")).then_some(NearMiss { name, meant })
        })
        .collect()
}

/// Whether `name` is one of the variables Kubernetes (and Docker links) set for every Service:
/// `<SERVICE>_SERVICE_HOST`, `<SERVICE>_SERVICE_PORT[_…]`, `<SERVICE>_PORT[_<n>_<PROTO>[_…]]`.
fn is_service_link(name: &str) -> bool {
    name.ends_with("_SERVICE_HOST")
        || name.contains("_SERVICE_PORT")
        || name.ends_with("_PORT")
        || ["_TCP", "_UDP", "_SCTP"]
            .iter()
            .any(|proto| name.contains(&format!("{proto}_")) || name.ends_with(proto))
            && name.contains("_PORT_")
}

/// The variable `name` most resembles: at most two edits away (for names of five characters or
/// more), or one of them the other with a part added (`JWT_SECRET`, `JWT_SECRET_KEY`).
fn resembled(name: &str) -> Option<&'static str> {
    let name_upper = name.to_ascii_uppercase();
    let bare = name_upper.strip_prefix("LQ_").unwrap_or(&name_upper);
    if let Some(same) = VARIABLES.iter().copied().find(|v| *v == bare) {
        return Some(same);
    }
    VARIABLES
        .iter()
        .copied()
        .filter_map(|known| {
            let distance = edit_distance(bare, known);
            let (short, long) = if bare.len() < known.len() { (bare, known) } else { (known, bare) };
            let added = &long[short.len().min(long.len())..];
            let extended = short.len() >= 6
                && long.starts_with(short)
                && added.len() <= 5
                && !matches!(added, "_PORT" | "_HOST" | "_ADDR" | "_NAME");
            (extended || (bare.len() >= 5 && distance <= 2)).then_some((distance, known))
        })
        .min()
        .map(|(_, known)| known)
}

/// Levenshtein distance between `a` and `b`.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn misses(names: &[&str]) -> Vec<(String, Option<&'static str>)> {
        near_misses(names.iter().map(|n| (*n).to_owned())).into_iter().map(|m| (m.name, m.meant)).collect()
    }

    #[test]
    fn misspelled_shortened_and_lq_names_are_caught_with_the_variable_meant() {
        assert_eq!(
            misses(&[
                "JWT_SECRET",
                "REDIS_ULR",
                "WEBHOOK_SECRET",
                "LQ_API_KEYS",
                "LQ_SOMETHING",
                "MAX_CONECTIONS",
                "redis_url"
            ]),
            [
                ("JWT_SECRET".to_owned(), Some("JWT_SECRET_KEY")),
                ("REDIS_ULR".to_owned(), Some("REDIS_URL")),
                ("WEBHOOK_SECRET".to_owned(), Some("WEBHOOK_SECRETS")),
                ("LQ_API_KEYS".to_owned(), Some("API_KEYS")),
                ("LQ_SOMETHING".to_owned(), None),
                ("MAX_CONECTIONS".to_owned(), Some("MAX_CONNECTIONS")),
                ("redis_url".to_owned(), Some("REDIS_URL")),
            ]
        );
    }

    #[test]
    fn the_usual_variables_of_a_machine_and_the_known_ones_are_left_alone() {
        let usual = [
            "PATH",
            "HOME",
            "USER",
            "SHELL",
            "TERM",
            "LANG",
            "PWD",
            "SHLVL",
            "HOSTNAME",
            "TZ",
            "LC_ALL",
            "CARGO_HOME",
            "RUSTUP_HOME",
            "KUBERNETES_SERVICE_HOST",
            "OLDPWD",
            "MAIL",
            "LOGNAME",
            "EDITOR",
        ];
        assert_eq!(misses(&usual), []);
        let known: Vec<&str> = VARIABLES.to_vec();
        assert_eq!(misses(&known), []);
    }

    #[test]
    fn a_warning_names_the_variable_meant() {
        let miss = NearMiss { name: "JWT_SECRET".to_owned(), meant: Some("JWT_SECRET_KEY") };
        assert_eq!(
            miss.to_string(),
            "JWT_SECRET is not a variable lq-realtime reads; did you mean JWT_SECRET_KEY?"
        );
    }
}
