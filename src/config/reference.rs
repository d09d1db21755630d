//! The settings table of `docs/configuration.md`, made from the settings' own definitions (flag, variable, default,
//! help) so that the page cannot drift from the code: a test compares the two, and `ingest-gateway
//! settings-reference docs/configuration.md` writes the table again after a change.

use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

use super::Cli;

/// The line before the table in the page.
pub const BEGIN: &str =
    "<!-- The table up to the end marker is made from src/config.rs by `cargo run -- settings-reference docs/configuration.md`; edit the settings' doc comments, not the table. -->";
/// The line after it.
pub const END: &str = "<!-- end of the generated settings table -->";

/// The table: a row per setting in the order of its definition, with its variable, flag, default and help.
pub fn table() -> String {
    let command = Cli::command();
    let mut table = String::from("| env (flag) | default | meaning |\n|---|---|---|\n");
    for arg in command.get_arguments() {
        let Some(env) = arg.get_env() else {
            continue;
        };
        let flag = arg.get_long().map_or_else(String::new, |long| format!(" (`--{long}`)"));
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let default = if defaults.is_empty() {
            "unset".to_owned()
        } else {
            format!("`{}`", defaults.join(","))
        };
        let help = arg
            .get_long_help()
            .or_else(|| arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        // One table cell: paragraphs and lines run together, and a `|` would end the cell.
        let help = help
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .replace('|', "\\|");
        table.push_str(&format!("| `{}`{flag} | {default} | {help} |\n", env.to_string_lossy()));
    }
    table
}

/// `page` with the text between [`BEGIN`] and [`END`] replaced by [`table`].
pub fn with_table(page: &str) -> anyhow::Result<String> {
    let begin = page
        .find(BEGIN)
        .with_context(|| format!("the page has no line {BEGIN:?} to put the table after"))?;
    let after_begin = begin + BEGIN.len();
    let end = page[after_begin..]
        .find(END)
        .map(|i| after_begin + i)
        .with_context(|| format!("the page has no line {END:?} after the table"))?;
    Ok(format!("{}\n\n{}\n{}", &page[..after_begin], table(), &page[end..]))
}

/// Writes the table into the page at `path`, between its markers.
pub fn rewrite(path: &Path) -> anyhow::Result<()> {
    let page = std::fs::read_to_string(path).with_context(|| format!("could not read {}", path.display()))?;
    let updated = with_table(&page).with_context(|| format!("in {}", path.display()))?;
    if updated != page {
        std::fs::write(path, updated).with_context(|| format!("could not write {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docs_configuration_md_holds_the_table_the_settings_make() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
        let page = std::fs::read_to_string(&path).expect("docs/configuration.md");
        let expected = with_table(&page).expect("the page has the table's markers");
        assert!(
            page == expected,
            "docs/configuration.md differs from the settings in src/config.rs; write it again with \
             `cargo run -- settings-reference docs/configuration.md`"
        );
    }

    #[test]
    fn every_setting_has_a_row_with_its_variable_flag_and_default() {
        let table = table();
        assert!(
            table.contains("| `INGEST_LISTEN` (`--listen`) | `127.0.0.1:8080` |"),
            "{table}"
        );
        assert!(
            table.contains("| `DATABASE_URL` (`--database-url`) | unset |"),
            "{table}"
        );
        assert!(
            table.contains("| `INGEST_LATEST_POSITIONS` (`--latest-positions`) | `true` |"),
            "{table}"
        );
        let rows = table.lines().count() - 2;
        let settings = Cli::command().get_arguments().filter(|a| a.get_env().is_some()).count();
        assert_eq!(rows, settings);
    }

    #[test]
    fn the_table_replaces_only_what_lies_between_the_markers() {
        let page = format!("# Title\n\nbefore\n\n{BEGIN}\nold table\n{END}\n\nafter\n");
        let updated = with_table(&page).unwrap();
        assert!(updated.starts_with(&format!("# Title\n\nbefore\n\n{BEGIN}\n\n| env (flag)")));
        assert!(updated.ends_with(&format!("|\n\n{END}\n\nafter\n")));
        assert_eq!(
            with_table(&updated).unwrap(),
            updated,
            "writing it twice changes nothing"
        );
        assert!(with_table("no markers").is_err());
    }
}
