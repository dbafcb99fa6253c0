//! The admin's mail in the language `[mail] language` names: the catalogues in
//! `server/locales/`, compiled into the binary.
//!
//! `en.toml` is the reference: every other catalogue has exactly its keys and, per key, its
//! placeholders (the tests check both); a text missing at run time falls back to English.
//! Only the mail is translated: the log, the status and the wire stay in English.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A language the admin's mail can be written in (`[mail] language`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MailLanguage {
    #[default]
    En,
    De,
    Fr,
}

impl MailLanguage {
    /// Every language with a catalogue.
    pub const ALL: [MailLanguage; 3] = [MailLanguage::En, MailLanguage::De, MailLanguage::Fr];

    /// The code the config uses, as the catalogue's file is named.
    pub fn code(self) -> &'static str {
        match self {
            MailLanguage::En => "en",
            MailLanguage::De => "de",
            MailLanguage::Fr => "fr",
        }
    }

    fn catalogue_source(self) -> &'static str {
        match self {
            MailLanguage::En => include_str!("../../locales/en.toml"),
            MailLanguage::De => include_str!("../../locales/de.toml"),
            MailLanguage::Fr => include_str!("../../locales/fr.toml"),
        }
    }
}

/// The mail's texts in one language.
#[derive(Debug, Clone)]
pub struct MailTexts {
    texts: BTreeMap<String, String>,
    /// What a text missing from `texts` falls back to.
    english: BTreeMap<String, String>,
}

fn parse(source: &str) -> Result<BTreeMap<String, String>, toml::de::Error> {
    toml::from_str(source)
}

impl MailTexts {
    pub fn new(language: MailLanguage) -> MailTexts {
        let load = |language: MailLanguage| {
            parse(language.catalogue_source()).unwrap_or_else(|err| {
                // The tests parse every catalogue; this is for a build that skipped them.
                tracing::warn!(language = language.code(), cause = %err, "the mail catalogue does not parse; using English");
                BTreeMap::new()
            })
        };
        MailTexts {
            texts: load(language),
            english: load(MailLanguage::En),
        }
    }

    /// The text of `key` with each `{name}` of `values` filled in.
    pub fn text(&self, key: &str, values: &[(&str, &str)]) -> String {
        let template = self
            .texts
            .get(key)
            .or_else(|| self.english.get(key))
            .map_or(key, String::as_str);
        fill(template, values)
    }

    /// One line of the mail's table: the label of `key`, the value aligned after it.
    pub fn row(&self, key: &str, value: impl std::fmt::Display) -> String {
        format!("{:<15} {value}\n", self.text(key, &[]))
    }
}

/// `template` with each `{name}` of `values` replaced by its value; an unknown `{name}` is
/// left as it is, and the values are not searched for placeholders in turn.
fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut filled = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        filled.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            filled.push_str(&rest[open..]);
            return filled;
        };
        let name = &after[..close];
        match values.iter().find(|(key, _)| *key == name) {
            Some((_, value)) => filled.push_str(value),
            None => filled.push_str(&rest[open..open + close + 2]),
        }
        rest = &after[close + 1..];
    }
    filled.push_str(rest);
    filled
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn placeholders(text: &str) -> BTreeSet<&str> {
        let mut names = BTreeSet::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            let after = &rest[open + 1..];
            let Some(close) = after.find('}') else { break };
            names.insert(&after[..close]);
            rest = &after[close + 1..];
        }
        names
    }

    #[test]
    fn every_mail_catalogue_has_the_keys_and_placeholders_of_the_english_one() {
        let english = parse(MailLanguage::En.catalogue_source()).expect("en.toml parses");
        assert!(english.len() >= 20, "{english:?}");
        for language in MailLanguage::ALL {
            let texts = parse(language.catalogue_source())
                .unwrap_or_else(|err| panic!("{}.toml does not parse: {err}", language.code()));
            let keys: BTreeSet<&String> = texts.keys().collect();
            let expected: BTreeSet<&String> = english.keys().collect();
            assert_eq!(keys, expected, "the keys of {}.toml", language.code());
            for (key, english_text) in &english {
                assert_eq!(
                    placeholders(&texts[key]),
                    placeholders(english_text),
                    "the placeholders of {key} in {}.toml",
                    language.code()
                );
            }
        }
    }

    #[test]
    fn the_config_names_languages_by_their_code() {
        #[derive(Deserialize)]
        struct Section {
            language: MailLanguage,
        }
        for language in MailLanguage::ALL {
            let text = format!("language = \"{}\"", language.code());
            let section: Section = toml::from_str(&text).unwrap();
            assert_eq!(section.language, language);
        }
        assert!(toml::from_str::<Section>("language = \"es\"").is_err());
    }

    #[test]
    fn filling_leaves_unknown_names_and_braces_in_values_alone() {
        assert_eq!(
            fill("{a} {b} {c} {", &[("a", "{b}"), ("b", "2")]),
            "{b} 2 {c} {"
        );
        let german = MailTexts::new(MailLanguage::De);
        assert_eq!(
            german.row("label_took", "1m 35s"),
            "Dauer:          1m 35s\n"
        );
        assert_eq!(
            german.row("label_sessions_warned", 12),
            "Gewarnte Sitzungen: 12\n"
        );
    }
}
