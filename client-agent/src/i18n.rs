//! What the agent tells the user, in the user's language: the text catalogues in
//! `client-agent/locales/`, the choice of language (`run --lang`, else the POSIX locale
//! variables), and the sentences built from a changeover's fields.
//!
//! The catalogues are TOML files of `key = "text with {placeholders}"` that a translator
//! edits; they are compiled into the binary. `en.toml` is the reference: every other
//! catalogue has exactly its keys and, per key, its placeholders (the tests check both), and a
//! text missing at run time falls back to the English one.
//!
//! Not for the log, which stays in English for support, nor for the admin commands.

use std::collections::BTreeMap;
use std::time::SystemTime;

use tracing::warn;

/// A language the agent has a catalogue for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Language {
    #[default]
    English,
    German,
    French,
}

/// The locale variables in the order POSIX gives them precedence: the first one set wins.
pub const LOCALE_VARIABLES: [&str; 3] = ["LC_ALL", "LC_MESSAGES", "LANG"];

impl Language {
    /// Every language with a catalogue.
    pub const ALL: [Language; 3] = [Language::English, Language::German, Language::French];

    /// The ISO 639-1 code, as the catalogue's file is named.
    pub fn code(self) -> &'static str {
        match self {
            Language::English => "en",
            Language::German => "de",
            Language::French => "fr",
        }
    }

    fn catalogue_source(self) -> &'static str {
        match self {
            Language::English => include_str!("../locales/en.toml"),
            Language::German => include_str!("../locales/de.toml"),
            Language::French => include_str!("../locales/fr.toml"),
        }
    }

    /// Whether `count` takes the singular (`_one`) form: 1 in English and German, 0 and 1
    /// in French.
    fn is_singular(self, count: u64) -> bool {
        match self {
            Language::English | Language::German => count == 1,
            Language::French => count <= 1,
        }
    }

    /// The language a locale names: `de_DE.UTF-8`, `fr_FR`, `de`, `de-DE` (Windows'
    /// spelling) or `fr_CA.UTF-8@euro`; `C` and `POSIX` are English. `None` for an empty
    /// name or a language without a catalogue.
    pub fn from_locale(locale: &str) -> Option<Language> {
        let name = locale.trim();
        // language[_territory][.codeset][@modifier]
        let language = name
            .split(['.', '@'])
            .next()
            .unwrap_or_default()
            .split(['_', '-'])
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        match language.as_str() {
            "en" | "c" | "posix" => Some(Language::English),
            "de" => Some(Language::German),
            "fr" => Some(Language::French),
            _ => None,
        }
    }

    /// The user's language: `lang_flag` (`run --lang`) if given, else the first of
    /// `LC_ALL`, `LC_MESSAGES` and `LANG` that is set and not empty, else on Windows the
    /// user's locale. English when the chosen name has no catalogue, or nothing names one.
    pub fn choose(lang_flag: Option<&str>) -> Language {
        let system_locale = || {
            #[cfg(windows)]
            {
                sys_locale::get_locale()
            }
            #[cfg(not(windows))]
            {
                None
            }
        };
        Language::choose_from(lang_flag, |name| std::env::var(name).ok(), system_locale)
    }

    /// [`Language::choose`] with the environment and the system's locale given.
    pub fn choose_from(
        lang_flag: Option<&str>,
        environment: impl Fn(&str) -> Option<String>,
        system_locale: impl FnOnce() -> Option<String>,
    ) -> Language {
        if let Some(flag) = lang_flag {
            return Language::from_locale(flag).unwrap_or_else(|| {
                warn!(lang = flag, "no texts in this language; using English");
                Language::English
            });
        }
        // POSIX: the first variable set decides, even if it names a language without a
        // catalogue; the later ones are not consulted then.
        let named = LOCALE_VARIABLES
            .iter()
            .find_map(|name| environment(name).filter(|value| !value.trim().is_empty()))
            .or_else(system_locale);
        named
            .as_deref()
            .and_then(Language::from_locale)
            .unwrap_or(Language::English)
    }
}

/// A language's texts, ready to be filled in.
#[derive(Debug, Clone)]
pub struct Catalogue {
    language: Language,
    texts: BTreeMap<String, String>,
    /// What a text missing from `texts` falls back to.
    english: BTreeMap<String, String>,
    /// The time zone deadlines are shown in; the system's when `None` (read each time, so
    /// a workstation that travels shows its new time).
    time_zone: Option<jiff::tz::TimeZone>,
}

impl Default for Catalogue {
    fn default() -> Self {
        Catalogue::new(Language::English)
    }
}

/// Parses a catalogue: flat `key = "text"` lines, nothing else.
fn parse(source: &str) -> Result<BTreeMap<String, String>, toml::de::Error> {
    toml::from_str(source)
}

impl Catalogue {
    /// The catalogue of `language`.
    pub fn new(language: Language) -> Catalogue {
        let load = |language: Language| {
            parse(language.catalogue_source()).unwrap_or_else(|err| {
                // The tests parse every catalogue; this is for a build that skipped them.
                warn!(language = language.code(), cause = %err, "the text catalogue does not parse; using English");
                BTreeMap::new()
            })
        };
        Catalogue {
            language,
            texts: load(language),
            english: load(Language::English),
            time_zone: None,
        }
    }

    /// The same texts with deadlines shown in `time_zone` instead of the system's.
    pub fn with_time_zone(mut self, time_zone: jiff::tz::TimeZone) -> Catalogue {
        self.time_zone = Some(time_zone);
        self
    }

    pub fn language(&self) -> Language {
        self.language
    }

    /// The text of `key`: this language's, else the English one, else the key itself.
    fn text<'a>(&'a self, key: &'a str) -> &'a str {
        self.texts
            .get(key)
            .or_else(|| self.english.get(key))
            .map_or(key, String::as_str)
    }

    fn fill(&self, key: &str, values: &[(&str, &str)]) -> String {
        fill(self.text(key), values)
    }

    /// The title of the desktop notifications.
    pub fn notification_title(&self) -> String {
        self.fill("notification_title", &[])
    }

    /// A countdown warning: the update to `target_version` in `seconds_left`, at `deadline`
    /// in local time, with the admin's words after it.
    pub fn warning(
        &self,
        target_version: &str,
        seconds_left: u64,
        deadline: SystemTime,
        admin_message: Option<&str>,
    ) -> String {
        let text = if seconds_left == 0 {
            self.fill("warning_now", &[("version", target_version)])
        } else {
            self.fill(
                "warning",
                &[
                    ("version", target_version),
                    ("time_left", &self.time_left(seconds_left)),
                    ("deadline", &self.local_time(deadline)),
                ],
            )
        };
        self.with_admin_message(text, admin_message)
    }

    /// The announced update (to `target_version`, if known) was called off.
    pub fn cancelled(&self, target_version: Option<&str>) -> String {
        match target_version.filter(|version| !version.is_empty()) {
            Some(version) => self.fill("cancelled", &[("version", version)]),
            None => self.fill("cancelled_no_version", &[]),
        }
    }

    /// The logout at the deadline, for the update to `target_version` if known, with the
    /// admin's words after it.
    pub fn logout(&self, target_version: Option<&str>, admin_message: Option<&str>) -> String {
        let text = match target_version.filter(|version| !version.is_empty()) {
            Some(version) => self.fill("logout", &[("version", version)]),
            None => self.fill("logout_no_version", &[]),
        };
        self.with_admin_message(text, admin_message)
    }

    /// The agent's own update: `version` is on offer, `running` runs now.
    pub fn update_offered(&self, version: &str, running: &str) -> String {
        self.fill(
            "update_offered",
            &[("version", version), ("running", running)],
        )
    }

    /// The agent's own update: `version` is being installed.
    pub fn update_installing(&self, version: &str) -> String {
        self.fill("update_installing", &[("version", version)])
    }

    /// The agent's own update: `version` is in place and starts.
    pub fn update_installed(&self, version: &str) -> String {
        self.fill("update_installed", &[("version", version)])
    }

    fn with_admin_message(&self, text: String, admin_message: Option<&str>) -> String {
        match admin_message
            .map(str::trim)
            .filter(|words| !words.is_empty())
        {
            Some(words) => self.fill(
                "with_admin_message",
                &[("text", &text), ("admin_message", words)],
            ),
            None => text,
        }
    }

    /// "2 minutes", "1 Minute", "45 secondes": whole minutes from a minute on (rounded
    /// down, so the user never gets more time than there is), seconds below.
    pub fn time_left(&self, seconds_left: u64) -> String {
        let (unit, count) = if seconds_left >= 60 {
            ("minutes", seconds_left / 60)
        } else {
            ("seconds", seconds_left)
        };
        let form = if self.language.is_singular(count) {
            "one"
        } else {
            "other"
        };
        self.fill(&format!("{unit}_{form}"), &[("count", &count.to_string())])
    }

    /// `at` as HH:MM in the workstation's time zone.
    pub fn local_time(&self, at: SystemTime) -> String {
        let time_zone = self
            .time_zone
            .clone()
            .unwrap_or_else(jiff::tz::TimeZone::system);
        match jiff::Timestamp::try_from(at) {
            Ok(timestamp) => {
                let local = timestamp.to_zoned_datetime(time_zone);
                format!("{:02}:{:02}", local.hour(), local.minute())
            }
            // Beyond jiff's years (±9999): the server's clock is broken, and no time helps.
            Err(_) => "--:--".to_owned(),
        }
    }
}

/// The admin's words in a warning: its `admin_message`, or from a server that sends none,
/// its English `message` unless that is the server's default sentence (which the user gets
/// in their own language instead).
pub fn admin_words(
    admin_message: Option<String>,
    message: &str,
    target_version: &str,
) -> Option<String> {
    admin_message.or_else(|| {
        let default = changeover_protocol::messages::default_warning_message(target_version);
        let message = message.trim();
        (message != default && !message.is_empty()).then(|| message.to_owned())
    })
}

/// `template` with each `{name}` of `values` replaced by its value. An unknown `{name}` is
/// left as it is; the values are not searched for placeholders in turn, so text from the
/// server (the admin's words) is shown as it came, except that control characters other
/// than line breaks are made visible: no server steers the terminal a hook writes to.
fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut filled = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        filled.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) => {
                let name = &after[..close];
                match values.iter().find(|(key, _)| *key == name) {
                    Some((_, value)) => push_visible(&mut filled, value),
                    None => {
                        filled.push('{');
                        filled.push_str(name);
                        filled.push('}');
                    }
                }
                rest = &after[close + 1..];
            }
            None => {
                filled.push_str(&rest[open..]);
                rest = "";
            }
        }
    }
    filled.push_str(rest);
    filled
}

fn push_visible(filled: &mut String, value: &str) {
    for (index, line) in value.split('\n').enumerate() {
        if index > 0 {
            filled.push('\n');
        }
        filled.push_str(&changeover_protocol::text::escape_control(line));
    }
}

/// The `{names}` a text uses.
#[cfg(test)]
fn placeholders(text: &str) -> std::collections::BTreeSet<&str> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else { break };
        names.insert(&after[..close]);
        rest = &after[close + 1..];
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::time::Duration;

    fn catalogue(language: Language) -> Catalogue {
        // 2026-11-28T12:32:08Z is 13:32 in Berlin and Paris (CET, UTC+1).
        let central_european = jiff::tz::TimeZone::fixed(jiff::tz::Offset::constant(1));
        Catalogue::new(language).with_time_zone(central_european)
    }

    fn deadline() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_869_128)
    }

    #[test]
    fn every_catalogue_has_the_keys_and_placeholders_of_the_english_one() {
        let english = parse(Language::English.catalogue_source()).expect("en.toml parses");
        assert!(english.len() >= 15, "{english:?}");
        for language in Language::ALL {
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
                assert!(
                    !texts[key].trim().is_empty(),
                    "{key} in {}.toml",
                    language.code()
                );
            }
        }
    }

    #[test]
    fn every_key_the_code_asks_for_is_in_the_english_catalogue() {
        let english = parse(Language::English.catalogue_source()).unwrap();
        for key in [
            "notification_title",
            "warning",
            "warning_now",
            "with_admin_message",
            "minutes_one",
            "minutes_other",
            "seconds_one",
            "seconds_other",
            "cancelled",
            "cancelled_no_version",
            "logout",
            "logout_no_version",
            "update_offered",
            "update_installing",
            "update_installed",
        ] {
            assert!(english.contains_key(key), "{key}");
        }
    }

    #[test]
    fn locale_names_are_read_as_posix_and_windows_write_them() {
        for (locale, language) in [
            ("de_DE.UTF-8", Some(Language::German)),
            ("de_AT", Some(Language::German)),
            ("de", Some(Language::German)),
            ("DE", Some(Language::German)),
            ("de-DE", Some(Language::German)),
            ("fr_FR", Some(Language::French)),
            ("fr_CA.UTF-8@euro", Some(Language::French)),
            ("fr", Some(Language::French)),
            ("en_GB.UTF-8", Some(Language::English)),
            ("C", Some(Language::English)),
            ("C.UTF-8", Some(Language::English)),
            ("POSIX", Some(Language::English)),
            ("es_ES.UTF-8", None),
            ("", None),
        ] {
            assert_eq!(Language::from_locale(locale), language, "{locale:?}");
        }
    }

    #[test]
    fn the_flag_wins_then_lc_all_lc_messages_lang_in_that_order() {
        let environment = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| (*value).to_owned())
            }
        };
        let no_system = || None;
        let everything = environment(&[
            ("LC_ALL", "fr_FR.UTF-8"),
            ("LC_MESSAGES", "de_DE.UTF-8"),
            ("LANG", "en_US.UTF-8"),
        ]);
        assert_eq!(
            Language::choose_from(Some("de"), everything, no_system),
            Language::German
        );
        assert_eq!(
            Language::choose_from(Some("de_DE.UTF-8"), everything, no_system),
            Language::German
        );
        assert_eq!(
            Language::choose_from(Some("klingon"), everything, no_system),
            Language::English
        );
        assert_eq!(
            Language::choose_from(None, everything, no_system),
            Language::French
        );
        let messages_and_lang = environment(&[
            ("LC_ALL", ""),
            ("LC_MESSAGES", "de_DE.UTF-8"),
            ("LANG", "fr_FR.UTF-8"),
        ]);
        assert_eq!(
            Language::choose_from(None, messages_and_lang, no_system),
            Language::German,
            "an empty LC_ALL counts as unset"
        );
        assert_eq!(
            Language::choose_from(None, environment(&[("LANG", "fr_FR")]), no_system),
            Language::French
        );
        assert_eq!(
            Language::choose_from(None, environment(&[("LANG", "C")]), || Some(
                "de-DE".to_owned()
            )),
            Language::English,
            "a set LANG wins over the system's locale"
        );
        assert_eq!(
            Language::choose_from(
                None,
                environment(&[("LC_ALL", "es_ES.UTF-8"), ("LANG", "de_DE.UTF-8")]),
                no_system
            ),
            Language::English,
            "the first variable set decides, even for a language without texts"
        );
        assert_eq!(
            Language::choose_from(None, environment(&[]), || Some("fr-FR".to_owned())),
            Language::French,
            "without variables, the system's locale (Windows)"
        );
        assert_eq!(
            Language::choose_from(None, environment(&[]), no_system),
            Language::English
        );
    }

    #[test]
    fn warnings_name_the_version_the_time_left_and_the_local_deadline() {
        assert_eq!(
            catalogue(Language::English).warning("2.4.0", 120, deadline(), None),
            "The server will be updated to version 2.4.0 in 2 minutes (at 13:32). Please save \
             your work and close the application."
        );
        assert_eq!(
            catalogue(Language::German).warning(
                "2.4.0",
                120,
                deadline(),
                Some(" Accounting is back at 12:45. ")
            ),
            "Der Server wird in 2 Minuten (um 13:32 Uhr) auf Version 2.4.0 aktualisiert. Bitte \
             speichern Sie Ihre Arbeit und schließen Sie die Anwendung. Nachricht der \
             Administration: Accounting is back at 12:45."
        );
        assert_eq!(
            catalogue(Language::French).warning("2.4.0", 5, deadline(), Some("")),
            "Le serveur sera mis à jour vers la version 2.4.0 dans 5 secondes (à 13:32). \
             Veuillez enregistrer votre travail et fermer l’application."
        );
        assert!(
            catalogue(Language::French)
                .warning("2.4.0", 0, deadline(), Some("Retour à 12h45."))
                .ends_with("Message de l’administration\u{a0}: Retour à 12h45."),
        );
    }

    #[test]
    fn time_left_takes_the_singular_by_each_language_s_rule() {
        let english = catalogue(Language::English);
        let german = catalogue(Language::German);
        let french = catalogue(Language::French);
        assert_eq!(english.time_left(1), "1 second");
        assert_eq!(english.time_left(59), "59 seconds");
        assert_eq!(english.time_left(60), "1 minute");
        assert_eq!(english.time_left(119), "1 minute", "rounded down");
        assert_eq!(english.time_left(300), "5 minutes");
        assert_eq!(german.time_left(1), "1 Sekunde");
        assert_eq!(german.time_left(30), "30 Sekunden");
        assert_eq!(german.time_left(60), "1 Minute");
        assert_eq!(german.time_left(120), "2 Minuten");
        assert_eq!(french.time_left(0), "0 seconde");
        assert_eq!(french.time_left(1), "1 seconde");
        assert_eq!(french.time_left(10), "10 secondes");
        assert_eq!(french.time_left(60), "1 minute");
        assert_eq!(french.time_left(180), "3 minutes");
    }

    #[test]
    fn cancel_logout_and_the_agent_s_update_in_each_language() {
        let german = catalogue(Language::German);
        assert_eq!(
            german.cancelled(Some("2.4.0")),
            "Das angekündigte Update des Servers auf Version 2.4.0 wurde abgesagt. Sie können \
             weiterarbeiten."
        );
        assert_eq!(
            german.cancelled(Some("")),
            german.cancelled(None),
            "an empty version is no version"
        );
        assert_eq!(
            german.logout(Some("2.4.0"), Some("Bis gleich!")),
            "Der Server wird jetzt auf Version 2.4.0 aktualisiert. Ihre Sitzung wurde beendet; \
             die Anwendung steht in Kürze wieder zur Verfügung. Nachricht der Administration: \
             Bis gleich!"
        );
        let french = catalogue(Language::French);
        assert!(
            french
                .logout(None, None)
                .starts_with("Le serveur est en cours de mise à jour.")
        );
        assert_eq!(
            french.update_offered("2.4.0", "2.3.0"),
            "La version 2.4.0 de l’agent Changeover est disponible\u{a0}; ce poste utilise la \
             version 2.3.0."
        );
        let english = catalogue(Language::English);
        assert_eq!(
            english.update_installed("2.4.0"),
            "Version 2.4.0 of the Changeover agent is installed and starts now."
        );
        assert_eq!(
            english.update_installing("2.4.0"),
            "Installing version 2.4.0 of the Changeover agent."
        );
        assert_eq!(english.notification_title(), "Server update");
        assert_eq!(german.notification_title(), "Server-Update");
        assert_eq!(french.notification_title(), "Mise à jour du serveur");
    }

    #[test]
    fn filling_leaves_unknown_names_and_the_values_own_braces_alone() {
        assert_eq!(
            fill(
                "{a} and {b} and {unknown} and {",
                &[("a", "{b}"), ("b", "x")]
            ),
            "{b} and x and {unknown} and {"
        );
        assert_eq!(fill("no placeholders", &[("a", "1")]), "no placeholders");
        assert_eq!(
            fill("[{a}]", &[("a", "save\u{1b}[2J\nnow\u{202e}")]),
            "[save\\x1b[2J\nnow\\u{202e}]"
        );
        assert_eq!(
            catalogue(Language::English).warning("2.4.0", 0, deadline(), Some("{text} {version}")),
            "The server is being updated to version 2.4.0 now. Please save your work and close \
             the application. Message from your administrator: {text} {version}"
        );
    }

    #[test]
    fn an_older_server_s_message_counts_as_the_admin_s_words_unless_it_is_the_default() {
        let default = changeover_protocol::messages::default_warning_message("2.4.0");
        assert_eq!(admin_words(None, &default, "2.4.0"), None);
        assert_eq!(
            admin_words(None, "Back at 12:45.", "2.4.0").as_deref(),
            Some("Back at 12:45.")
        );
        assert_eq!(
            admin_words(Some("Back at 12:45.".to_owned()), "Back at 12:45.", "2.4.0").as_deref(),
            Some("Back at 12:45.")
        );
        assert_eq!(admin_words(None, " ", "2.4.0"), None);
    }

    #[test]
    fn a_deadline_beyond_any_calendar_is_shown_as_no_time() {
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        assert_eq!(catalogue(Language::English).local_time(far), "--:--");
        assert_eq!(catalogue(Language::English).local_time(deadline()), "13:32");
    }
}
