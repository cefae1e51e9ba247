//! The Capybara agent library (skeleton).
