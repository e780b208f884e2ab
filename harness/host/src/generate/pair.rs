//! A multiple-choice question/answer pair: read from what a teacher wrote (the formats of the
//! paper's Listings 2 and 3) or from an MMLU prompt's question block, checked to be well formed
//! (a question, exactly four options A-D, one answer letter among them), and written back as
//! the Listing-1 question block the student is evaluated on.

/// The option letters, in order.
pub const LETTERS: [char; 4] = ['A', 'B', 'C', 'D'];

/// One well-formed question: its stem, four options and the index (0..4) of the right one.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub question: String,
    pub options: [String; 4],
    pub answer: usize,
}

/// Why a teacher's text is not a usable pair (the well-formedness filter's reasons).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Malformed {
    #[error("no <{0}>...</{0}> section")]
    MissingTag(&'static str),
    #[error("not four options A-D")]
    Options,
    #[error("the answer is not one letter A-D or one option's text")]
    Answer,
    #[error("the question has no text before its options")]
    EmptyQuestion,
}

impl Pair {
    /// The Listing-1 question block ending in `Answer:`, as the mmlu task writes it with
    /// letter scoring.
    pub fn block(&self) -> String {
        let mut s = format!("Question: {}\n", self.question.trim());
        for (letter, option) in LETTERS.iter().zip(&self.options) {
            s.push_str(&format!("{letter}. {}\n", option.trim()));
        }
        s.push_str("Answer:");
        s
    }

    /// The question with its options on one text, the form teachers are shown.
    pub fn with_options(&self) -> String {
        let mut s = self.question.trim().to_string();
        for (letter, option) in LETTERS.iter().zip(&self.options) {
            s.push_str(&format!("\n{letter}. {}", option.trim()));
        }
        s
    }

    pub fn answer_letter(&self) -> char {
        LETTERS[self.answer]
    }

    /// The text duplicates are judged on: stem and options, normalised.
    pub fn fingerprint(&self) -> String {
        normalise(&self.with_options())
    }
}

/// Lower case, letters and digits only, single spaces: what two questions that differ only in
/// case, punctuation or spacing share.
pub fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars().flat_map(char::to_lowercase));
    }
    out
}

/// The text between `<tag>` and `</tag>` (the closing tag may be missing at the very end, as
/// a model cut off by its token limit writes it).
fn tagged<'a>(text: &'a str, tag: &'static str) -> Result<&'a str, Malformed> {
    let open = format!("<{tag}>");
    let start = text.find(&open).ok_or(Malformed::MissingTag(tag))? + open.len();
    let rest = &text[start..];
    let end = rest.find(&format!("</{tag}>")).unwrap_or(rest.len());
    Ok(rest[..end].trim())
}

/// A pair from Listing 3's `<question>...</question><answer>...</answer>`.
pub fn from_question_answer(text: &str) -> Result<Pair, Malformed> {
    let question = tagged(text, "question")?;
    let answer = tagged(text, "answer")?;
    with_answer(question, answer)
}

/// A pair from Listing 2's `<prompt>...</prompt><response>...</response>`.
pub fn from_prompt_response(text: &str) -> Result<Pair, Malformed> {
    let prompt = tagged(text, "prompt")?;
    let response = tagged(text, "response")?;
    with_answer(prompt, response)
}

/// The question block at the end of an MMLU prompt (`Question: ...\nA. ...\nAnswer:`), with
/// the answer given by its letter.
pub fn from_block(context: &str, answer: &str) -> Result<Pair, Malformed> {
    let start = context
        .rfind("Question: ")
        .map(|i| i + "Question: ".len())
        .ok_or(Malformed::MissingTag("question"))?;
    let body = context[start..].trim_end();
    let body = body.strip_suffix("Answer:").unwrap_or(body);
    with_answer(body, answer)
}

/// The question text with its options, and the answer as a letter (`B`, `(B)`, `B. text`) or
/// as one option's exact text.
fn with_answer(question: &str, answer: &str) -> Result<Pair, Malformed> {
    let (stem, options) = split_options(question)?;
    let answer = answer_index(answer, &options).ok_or(Malformed::Answer)?;
    Ok(Pair {
        question: stem,
        options,
        answer,
    })
}

/// Where option `letter` starts at or after `from`: `A.`, `A)`, `(A)` or `A:` at the start of
/// the text, of a line, or after a space; returns (marker start, text start).
fn marker(text: &str, letter: char, from: usize) -> Option<(usize, usize)> {
    let forms = [
        format!("({letter})"),
        format!("{letter}."),
        format!("{letter})"),
        format!("{letter}:"),
    ];
    let mut best: Option<(usize, usize)> = None;
    for form in &forms {
        let mut search = from;
        while let Some(found) = text[search..].find(form.as_str()) {
            let at = search + found;
            let before_ok = at == 0
                || text[..at]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c == '\n' || c == ' ' || c == '\t');
            let end = at + form.len();
            let after_ok = text[end..]
                .chars()
                .next()
                .is_none_or(|c| c == ' ' || c == '\t');
            if before_ok && after_ok {
                if best.is_none_or(|(b, _)| at < b) {
                    best = Some((at, end));
                }
                break;
            }
            search = at + form.len();
        }
    }
    best
}

/// The stem and the four option texts of a question written with its options. The options
/// are a chain of markers A, B, C, D in order; a stem may mention "A." itself, so of every
/// complete chain the one with the most markers at line starts wins, the last of equals.
fn split_options(text: &str) -> Result<(String, [String; 4]), Malformed> {
    let at_line_start = |at: usize| at == 0 || text[..at].ends_with('\n');
    let mut best: Option<(usize, Vec<(usize, usize)>)> = None;
    let mut from = 0;
    while let Some(a) = marker(text, 'A', from) {
        let mut spans = vec![a];
        for letter in &LETTERS[1..] {
            match marker(text, *letter, spans.last().unwrap().1) {
                Some(m) => spans.push(m),
                None => break,
            }
        }
        if spans.len() == 4 {
            let lines = spans.iter().filter(|s| at_line_start(s.0)).count();
            if best.as_ref().is_none_or(|(b, _)| lines >= *b) {
                best = Some((lines, spans));
            }
        }
        from = a.1;
    }
    let (_, spans) = best.ok_or(Malformed::Options)?;
    let stem = text[..spans[0].0].trim().to_string();
    if stem.is_empty() {
        return Err(Malformed::EmptyQuestion);
    }
    let mut options: [String; 4] = Default::default();
    for i in 0..4 {
        let end = spans.get(i + 1).map_or(text.len(), |s| s.0);
        options[i] = text[spans[i].1..end].trim().to_string();
    }
    if options.iter().any(String::is_empty) || marker(text, 'E', spans[3].1).is_some() {
        return Err(Malformed::Options);
    }
    Ok((stem, options))
}

/// The index of the answer: a letter, alone or marked (`(C)`, `C.`, `C) text`), or exactly
/// one option's text (normalised).
fn answer_index(answer: &str, options: &[String; 4]) -> Option<usize> {
    let a = answer.trim();
    let letter_at = |c: char| LETTERS.iter().position(|l| *l == c);
    let mut chars = a.chars();
    let letter = match (chars.next(), chars.next()) {
        (Some(c), None) => letter_at(c),
        (Some('('), Some(c)) if a[c.len_utf8() + 1..].starts_with(')') => letter_at(c),
        (Some(c), Some('.' | ')' | ':')) => letter_at(c),
        _ => None,
    };
    if letter.is_some() {
        return letter;
    }
    let said = normalise(a);
    let hits: Vec<usize> = (0..4).filter(|&i| normalise(&options[i]) == said).collect();
    (hits.len() == 1).then(|| hits[0])
}

/// The answer letter in a model's reply to a Listing-1 prompt: its first word when that is a
/// letter A-D (` B`, `B.`, `(B) because`), else the letter after "is" (`The answer is D.`).
pub fn letter_in_reply(reply: &str) -> Option<usize> {
    let words: Vec<&str> = reply
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let letter = |w: &str| {
        let mut c = w.chars();
        match (c.next(), c.next()) {
            (Some(l), None) => LETTERS.iter().position(|x| *x == l),
            _ => None,
        }
    };
    let first = words.first().and_then(|w| letter(w));
    first.or_else(|| {
        words
            .windows(2)
            .find(|w| w[0].eq_ignore_ascii_case("is"))
            .and_then(|w| letter(w[1]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_3_reply_with_options_on_lines_or_inline() {
        let p = from_question_answer(
            "<question>Which loss suits classification?\nA. MSE\nB. Cross-entropy\nC) Hinge only\n(D) None</question>\n<answer>B</answer>",
        )
        .unwrap();
        assert_eq!(p.question, "Which loss suits classification?");
        assert_eq!(
            p.options,
            ["MSE", "Cross-entropy", "Hinge only", "None"].map(String::from)
        );
        assert_eq!(p.answer, 1);
        let inline = from_question_answer(
            "<question>What is 2+2? A) 3 B) 4 C) 5 D) 22</question><answer>(B)</answer>",
        )
        .unwrap();
        assert_eq!(inline.options[1], "4");
        assert_eq!(inline.answer, 1);
        assert_eq!(
            inline.block(),
            "Question: What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
        );
    }

    #[test]
    fn listing_2_reply_answered_by_text() {
        let p = from_prompt_response(
            "<prompt>Pick the prime.\nA. 4\nB. 6\nC. 7\nD. 9</prompt>\n<response>7</response>",
        )
        .unwrap();
        assert_eq!(p.answer, 2);
    }

    #[test]
    fn malformed_replies_say_why() {
        assert_eq!(
            from_question_answer("Q: what? A. x B. y").unwrap_err(),
            Malformed::MissingTag("question")
        );
        assert_eq!(
            from_question_answer("<question>Pick. A. x B. y C. z</question><answer>A</answer>")
                .unwrap_err(),
            Malformed::Options
        );
        assert_eq!(
            from_question_answer(
                "<question>Pick. A. x B. y C. z D. w E. v</question><answer>A</answer>"
            )
            .unwrap_err(),
            Malformed::Options
        );
        assert_eq!(
            from_question_answer(
                "<question>Pick. A. x B. y C. z D. w</question><answer>E</answer>"
            )
            .unwrap_err(),
            Malformed::Answer
        );
        assert_eq!(
            from_question_answer("<question>A. x B. y C. z D. w</question><answer>A</answer>")
                .unwrap_err(),
            Malformed::EmptyQuestion
        );
    }

    #[test]
    fn a_stem_mentioning_a_letter_is_not_an_option() {
        let p = from_block(
            "header\n\nQuestion: Statement A. is true. Which holds?\nA. one\nB. two\nC. three\nD. four\nAnswer:",
            "D",
        )
        .unwrap();
        assert_eq!(p.question, "Statement A. is true. Which holds?");
        assert_eq!(p.answer, 3);
    }

    #[test]
    fn replies_to_listing_1_give_their_letter() {
        assert_eq!(letter_in_reply(" B"), Some(1));
        assert_eq!(letter_in_reply("(C) because"), Some(2));
        assert_eq!(letter_in_reply("The answer is D."), Some(3));
        assert_eq!(letter_in_reply(" Maybe"), None);
        assert_eq!(letter_in_reply(""), None);
    }

    #[test]
    fn normalised_text_ignores_case_spacing_and_punctuation() {
        assert_eq!(normalise("  What is  2+2?\nA. Four!"), "what is 2 2 a four");
    }
}
