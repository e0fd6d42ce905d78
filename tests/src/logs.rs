//! Reading line-per-record logs that the controller is still writing.

use std::path::Path;

/// The complete lines of `text`: a reader of a live log may catch the
/// writer in the middle of its last line, which is not a record yet.
pub fn complete_lines(text: &str) -> std::str::Lines<'_> {
    text.rfind('\n').map_or("", |end| &text[..end]).lines()
}

/// The complete lines of the file at `path`; none when it does not exist yet.
pub fn read_complete_lines(path: &Path) -> std::io::Result<Vec<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(complete_lines(&text).map(str::to_owned).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::complete_lines;

    #[test]
    fn a_partial_last_line_is_not_returned() {
        let got: Vec<&str> = complete_lines("{\"a\":1}\n{\"b\":2}\n{\"c\"").collect();
        assert_eq!(got, ["{\"a\":1}", "{\"b\":2}"]);
        assert_eq!(complete_lines("{\"c\"").count(), 0);
        assert_eq!(complete_lines("x\n").collect::<Vec<_>>(), ["x"]);
    }
}
