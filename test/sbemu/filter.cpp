// sbemu/filter.cpp
//   Correlation and SQL filter evaluation for topic subscriptions.
#include "filter.hpp"

#include "util.hpp"

#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

namespace sbemu {

FilterValue
FilterValue::FromAmqp(const amqp::Value &v) {
	FilterValue f;
	using K = amqp::Value::Kind;
	switch (v.kind) {
	case K::Bool:
		f.kind = Kind::Bool;
		f.b = v.u != 0;
		break;
	case K::UByte:
	case K::UShort:
	case K::UInt:
	case K::ULong:
	case K::Byte:
	case K::Short:
	case K::Int:
	case K::Long:
	case K::Timestamp:
		f.kind = Kind::Int;
		f.i = v.AsInt();
		break;
	case K::Float:
	case K::Double:
		f.kind = Kind::Double;
		f.d = v.d;
		break;
	case K::Null:
		break;
	default:
		f.kind = Kind::String;
		f.s = v.ToText();
		break;
	}
	return f;
}

namespace {

bool
IsNumeric(const FilterValue &v) {
	return v.kind == FilterValue::Kind::Int || v.kind == FilterValue::Kind::Double;
}
double
AsDouble(const FilterValue &v) {
	return v.kind == FilterValue::Kind::Int ? static_cast<double>(v.i) : v.d;
}

// Three-valued comparison result: -2 unknown (null or incomparable), else -1/0/1.
int
Compare(const FilterValue &a, const FilterValue &b) {
	using K = FilterValue::Kind;
	if (a.kind == K::Null || b.kind == K::Null)
		return -2;
	if (IsNumeric(a) && IsNumeric(b)) {
		if (a.kind == K::Int && b.kind == K::Int)
			return a.i < b.i ? -1 : (a.i > b.i ? 1 : 0);
		double x = AsDouble(a), y = AsDouble(b);
		if (std::isnan(x) || std::isnan(y))
			return -2;
		return x < y ? -1 : (x > y ? 1 : 0);
	}
	if (a.kind == K::String && b.kind == K::String) {
		int c = a.s.compare(b.s);
		return c < 0 ? -1 : (c > 0 ? 1 : 0);
	}
	if (a.kind == K::Bool && b.kind == K::Bool)
		return a.b == b.b ? 0 : (a.b ? 1 : -1);
	return -2;
}

bool
Equal(const FilterValue &a, const FilterValue &b) {
	return Compare(a, b) == 0;
}

// Correlation filter values compare as Service Bus does: by value, strings exactly.
bool
CorrelationEqual(const FilterValue &want, const amqp::Value *got) {
	if (!got)
		return false;
	FilterValue g = FilterValue::FromAmqp(*got);
	if (Equal(want, g))
		return true;
	// A numeric JSON value in a config file may be compared against a string property and
	// vice versa: compare their texts as a last resort.
	if ((want.kind == FilterValue::Kind::String) != (g.kind == FilterValue::Kind::String)) {
		auto text = [](const FilterValue &v) {
			switch (v.kind) {
			case FilterValue::Kind::Bool:
				return std::string(v.b ? "true" : "false");
			case FilterValue::Kind::Int:
				return std::to_string(v.i);
			case FilterValue::Kind::Double: {
				char buf[64];
				std::snprintf(buf, sizeof buf, "%.17g", v.d);
				return std::string(buf);
			}
			case FilterValue::Kind::String:
				return v.s;
			default:
				return std::string();
			}
		};
		return text(want) == text(g);
	}
	return false;
}

const amqp::Value *
AppProp(const FilterInput &m, const std::string &name) {
	if (!m.app_props || m.app_props->kind != amqp::Value::Kind::Map)
		return nullptr;
	return m.app_props->Get(name);
}

// System property by its SQL filter name (case-insensitive).
bool
SystemProp(const FilterInput &m, const std::string &name, FilterValue *out) {
	std::string n = ToLower(name);
	auto str = [&](const std::string &s) {
		out->kind = s.empty() ? FilterValue::Kind::Null : FilterValue::Kind::String;
		out->s = s;
		return true;
	};
	if (n == "messageid")
		return str(m.message_id);
	if (n == "correlationid")
		return str(m.correlation_id);
	if (n == "to")
		return str(m.to);
	if (n == "replyto")
		return str(m.reply_to);
	if (n == "label" || n == "subject")
		return str(m.subject);
	if (n == "sessionid")
		return str(m.session_id);
	if (n == "replytosessionid")
		return str(m.reply_to_session_id);
	if (n == "contenttype")
		return str(m.content_type);
	if (n == "sequencenumber") {
		out->kind = FilterValue::Kind::Int;
		out->i = static_cast<int64_t>(m.sequence_number);
		return true;
	}
	if (n == "enqueuedtimeutc") {
		out->kind = FilterValue::Kind::Int;
		out->i = m.enqueued_ms;
		return true;
	}
	return false;
}

} // namespace

bool
CorrelationFilter::Empty() const {
	return !content_type && !correlation_id && !label && !message_id && !reply_to && !reply_to_session_id &&
	       !session_id && !to && properties.empty();
}

bool
CorrelationFilter::Match(const FilterInput &m) const {
	auto eq = [](const std::optional<std::string> &want, const std::string &got) { return !want || *want == got; };
	if (!eq(content_type, m.content_type) || !eq(correlation_id, m.correlation_id) || !eq(label, m.subject) ||
	    !eq(message_id, m.message_id) || !eq(reply_to, m.reply_to) || !eq(reply_to_session_id, m.reply_to_session_id) ||
	    !eq(session_id, m.session_id) || !eq(to, m.to))
		return false;
	for (auto &p : properties)
		if (!CorrelationEqual(p.second, AppProp(m, p.first)))
			return false;
	return true;
}

// ---------------------------------------------------------------------------------------------
// SQL filter

struct SqlFilter::Node {
	enum class Op {
		Literal,
		Prop, // s = name, sys = system property
		Exists,
		Not,
		And,
		Or,
		Cmp, // s = operator
		Arith,
		Neg,
		In,   // children[0] expr, rest list
		Like, // children[0] expr, pattern in value.s, escape in esc
		IsNull,
	} op = Op::Literal;
	FilterValue value;
	std::string s;
	bool sys = false;
	bool negate = false; // NOT IN, NOT LIKE, IS NOT NULL
	char esc = 0;
	std::vector<std::unique_ptr<Node>> kids;
};

SqlFilter::~SqlFilter() = default;

namespace {

struct Token {
	enum class T { End, Ident, Number, String, Op, LParen, RParen, Comma } t = T::End;
	std::string text;
};

class Lexer {
  public:
	explicit Lexer(const std::string &s) : s_(s) {}
	bool Next(Token *tok, std::string *err) {
		while (pos_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[pos_])))
			++pos_;
		*tok = Token();
		if (pos_ >= s_.size())
			return true;
		char c = s_[pos_];
		if (c == '(') {
			tok->t = Token::T::LParen;
			++pos_;
			return true;
		}
		if (c == ')') {
			tok->t = Token::T::RParen;
			++pos_;
			return true;
		}
		if (c == ',') {
			tok->t = Token::T::Comma;
			++pos_;
			return true;
		}
		if (c == '\'') {
			std::string v;
			++pos_;
			for (;;) {
				if (pos_ >= s_.size()) {
					*err = "unterminated string literal";
					return false;
				}
				if (s_[pos_] == '\'') {
					if (pos_ + 1 < s_.size() && s_[pos_ + 1] == '\'') {
						v += '\'';
						pos_ += 2;
						continue;
					}
					++pos_;
					break;
				}
				v += s_[pos_++];
			}
			tok->t = Token::T::String;
			tok->text = v;
			return true;
		}
		if (std::isdigit(static_cast<unsigned char>(c)) ||
		    (c == '.' && pos_ + 1 < s_.size() && std::isdigit(static_cast<unsigned char>(s_[pos_ + 1])))) {
			size_t start = pos_;
			while (pos_ < s_.size() && (std::isdigit(static_cast<unsigned char>(s_[pos_])) || s_[pos_] == '.' ||
			                            s_[pos_] == 'e' || s_[pos_] == 'E'))
				++pos_;
			tok->t = Token::T::Number;
			tok->text = s_.substr(start, pos_ - start);
			return true;
		}
		if (c == '[') {
			size_t end = s_.find(']', pos_);
			if (end == std::string::npos) {
				*err = "unterminated [identifier]";
				return false;
			}
			tok->t = Token::T::Ident;
			tok->text = s_.substr(pos_ + 1, end - pos_ - 1);
			pos_ = end + 1;
			return true;
		}
		if (std::isalpha(static_cast<unsigned char>(c)) || c == '_' || c == '$') {
			size_t start = pos_;
			while (pos_ < s_.size() && (std::isalnum(static_cast<unsigned char>(s_[pos_])) || s_[pos_] == '_' ||
			                            s_[pos_] == '$' || s_[pos_] == '.' || s_[pos_] == '-'))
				++pos_;
			tok->t = Token::T::Ident;
			tok->text = s_.substr(start, pos_ - start);
			return true;
		}
		static const char *ops[] = {"<>", "!=", ">=", "<=", "=", "<", ">", "+", "-", "*", "/", "%"};
		for (const char *op : ops) {
			size_t n = std::strlen(op);
			if (s_.compare(pos_, n, op) == 0) {
				tok->t = Token::T::Op;
				tok->text = op;
				pos_ += n;
				return true;
			}
		}
		*err = std::string("unexpected character '") + c + "'";
		return false;
	}

  private:
	const std::string &s_;
	size_t pos_ = 0;
};

using NodeP = std::unique_ptr<SqlFilter::Node>;
using Op = SqlFilter::Node::Op;

class Parser {
  public:
	explicit Parser(const std::string &s) : lex_(s) {}
	NodeP ParseAll(std::string *err) {
		err_ = err;
		if (!Advance())
			return nullptr;
		NodeP n = Or();
		if (!n)
			return nullptr;
		if (tok_.t != Token::T::End)
			return Fail("unexpected '" + tok_.text + "' after the expression");
		return n;
	}

  private:
	// Bounds the parser's recursion (parentheses, NOT, unary minus).
	static constexpr int kMaxDepth = 200;
	struct Depth {
		int &d;
		explicit Depth(int &x) : d(x) { ++d; }
		~Depth() { --d; }
	};
	bool Advance() { return lex_.Next(&tok_, err_); }
	NodeP Fail(const std::string &m) {
		if (err_->empty())
			*err_ = m;
		return nullptr;
	}
	bool Keyword(const char *kw) const { return tok_.t == Token::T::Ident && IEquals(tok_.text, kw); }
	NodeP Make(Op op) {
		NodeP n(new SqlFilter::Node);
		n->op = op;
		return n;
	}
	NodeP Or() {
		Depth guard(depth_);
		if (depth_ > kMaxDepth)
			return Fail("the expression is nested too deeply");
		NodeP l = And();
		while (l && Keyword("OR")) {
			if (!Advance())
				return nullptr;
			NodeP r = And();
			if (!r)
				return nullptr;
			NodeP n = Make(Op::Or);
			n->kids.push_back(std::move(l));
			n->kids.push_back(std::move(r));
			l = std::move(n);
		}
		return l;
	}
	NodeP And() {
		NodeP l = Not();
		while (l && Keyword("AND")) {
			if (!Advance())
				return nullptr;
			NodeP r = Not();
			if (!r)
				return nullptr;
			NodeP n = Make(Op::And);
			n->kids.push_back(std::move(l));
			n->kids.push_back(std::move(r));
			l = std::move(n);
		}
		return l;
	}
	NodeP Not() {
		Depth guard(depth_);
		if (depth_ > kMaxDepth)
			return Fail("the expression is nested too deeply");
		if (Keyword("NOT")) {
			if (!Advance())
				return nullptr;
			NodeP inner = Not();
			if (!inner)
				return nullptr;
			NodeP n = Make(Op::Not);
			n->kids.push_back(std::move(inner));
			return n;
		}
		return Predicate();
	}
	NodeP Predicate() {
		if (Keyword("EXISTS")) {
			if (!Advance() || tok_.t != Token::T::LParen)
				return Fail("EXISTS needs (property)");
			if (!Advance() || tok_.t != Token::T::Ident)
				return Fail("EXISTS needs a property name");
			NodeP n = PropNode(tok_.text);
			n->op = Op::Exists;
			if (!Advance() || tok_.t != Token::T::RParen)
				return Fail("EXISTS needs a closing parenthesis");
			if (!Advance())
				return nullptr;
			return n;
		}
		NodeP l = Additive();
		if (!l)
			return nullptr;
		if (tok_.t == Token::T::Op && (tok_.text == "=" || tok_.text == "<>" || tok_.text == "!=" || tok_.text == "<" ||
		                               tok_.text == ">" || tok_.text == "<=" || tok_.text == ">=")) {
			std::string op = tok_.text == "!=" ? "<>" : tok_.text;
			if (!Advance())
				return nullptr;
			NodeP r = Additive();
			if (!r)
				return nullptr;
			NodeP n = Make(Op::Cmp);
			n->s = op;
			n->kids.push_back(std::move(l));
			n->kids.push_back(std::move(r));
			return n;
		}
		bool negate = false;
		if (Keyword("NOT")) {
			negate = true;
			if (!Advance())
				return nullptr;
			if (!Keyword("IN") && !Keyword("LIKE"))
				return Fail("expected IN or LIKE after NOT");
		}
		if (Keyword("IN")) {
			if (!Advance() || tok_.t != Token::T::LParen)
				return Fail("IN needs a parenthesised list");
			NodeP n = Make(Op::In);
			n->negate = negate;
			n->kids.push_back(std::move(l));
			do {
				if (!Advance())
					return nullptr;
				NodeP item = Additive();
				if (!item)
					return nullptr;
				n->kids.push_back(std::move(item));
			} while (tok_.t == Token::T::Comma);
			if (tok_.t != Token::T::RParen)
				return Fail("IN list needs a closing parenthesis");
			if (!Advance())
				return nullptr;
			return n;
		}
		if (Keyword("LIKE")) {
			if (!Advance() || tok_.t != Token::T::String)
				return Fail("LIKE needs a string pattern");
			NodeP n = Make(Op::Like);
			n->negate = negate;
			n->value.kind = FilterValue::Kind::String;
			n->value.s = tok_.text;
			n->kids.push_back(std::move(l));
			if (!Advance())
				return nullptr;
			if (Keyword("ESCAPE")) {
				if (!Advance() || tok_.t != Token::T::String || tok_.text.size() != 1)
					return Fail("ESCAPE needs a one-character string");
				n->esc = tok_.text[0];
				if (!Advance())
					return nullptr;
			}
			return n;
		}
		if (Keyword("IS")) {
			if (!Advance())
				return nullptr;
			NodeP n = Make(Op::IsNull);
			if (Keyword("NOT")) {
				n->negate = true;
				if (!Advance())
					return nullptr;
			}
			if (!Keyword("NULL"))
				return Fail("expected NULL after IS");
			if (!Advance())
				return nullptr;
			n->kids.push_back(std::move(l));
			return n;
		}
		return l;
	}
	NodeP Additive() {
		NodeP l = Multiplicative();
		while (l && tok_.t == Token::T::Op && (tok_.text == "+" || tok_.text == "-")) {
			std::string op = tok_.text;
			if (!Advance())
				return nullptr;
			NodeP r = Multiplicative();
			if (!r)
				return nullptr;
			NodeP n = Make(Op::Arith);
			n->s = op;
			n->kids.push_back(std::move(l));
			n->kids.push_back(std::move(r));
			l = std::move(n);
		}
		return l;
	}
	NodeP Multiplicative() {
		NodeP l = Unary();
		while (l && tok_.t == Token::T::Op && (tok_.text == "*" || tok_.text == "/" || tok_.text == "%")) {
			std::string op = tok_.text;
			if (!Advance())
				return nullptr;
			NodeP r = Unary();
			if (!r)
				return nullptr;
			NodeP n = Make(Op::Arith);
			n->s = op;
			n->kids.push_back(std::move(l));
			n->kids.push_back(std::move(r));
			l = std::move(n);
		}
		return l;
	}
	NodeP Unary() {
		Depth guard(depth_);
		if (depth_ > kMaxDepth)
			return Fail("the expression is nested too deeply");
		if (tok_.t == Token::T::Op && (tok_.text == "-" || tok_.text == "+")) {
			bool neg = tok_.text == "-";
			if (!Advance())
				return nullptr;
			NodeP inner = Unary();
			if (!inner || !neg)
				return inner;
			NodeP n = Make(Op::Neg);
			n->kids.push_back(std::move(inner));
			return n;
		}
		return Primary();
	}
	NodeP PropNode(const std::string &ident) {
		NodeP n = Make(Op::Prop);
		if (IStartsWith(ident, "sys.")) {
			n->sys = true;
			n->s = ident.substr(4);
		} else if (IStartsWith(ident, "user.")) {
			n->s = ident.substr(5);
		} else {
			n->s = ident;
		}
		return n;
	}
	NodeP Primary() {
		if (tok_.t == Token::T::LParen) {
			if (!Advance())
				return nullptr;
			NodeP n = Or();
			if (!n)
				return nullptr;
			if (tok_.t != Token::T::RParen)
				return Fail("missing closing parenthesis");
			if (!Advance())
				return nullptr;
			return n;
		}
		NodeP n = Make(Op::Literal);
		if (tok_.t == Token::T::Number) {
			if (tok_.text.find_first_of(".eE") != std::string::npos) {
				n->value.kind = FilterValue::Kind::Double;
				n->value.d = std::strtod(tok_.text.c_str(), nullptr);
			} else {
				n->value.kind = FilterValue::Kind::Int;
				n->value.i = std::strtoll(tok_.text.c_str(), nullptr, 10);
			}
		} else if (tok_.t == Token::T::String) {
			n->value.kind = FilterValue::Kind::String;
			n->value.s = tok_.text;
		} else if (Keyword("TRUE") || Keyword("FALSE")) {
			n->value.kind = FilterValue::Kind::Bool;
			n->value.b = Keyword("TRUE");
		} else if (Keyword("NULL")) {
			n->value.kind = FilterValue::Kind::Null;
		} else if (tok_.t == Token::T::Ident) {
			n = PropNode(tok_.text);
		} else {
			return Fail(tok_.t == Token::T::End ? "unexpected end of expression" : "unexpected '" + tok_.text + "'");
		}
		if (!Advance())
			return nullptr;
		return n;
	}

	Lexer lex_;
	Token tok_;
	std::string *err_ = nullptr;
	int depth_ = 0;
};

// SQL LIKE with % and _ and an optional escape character. Iterative, with backtracking to the
// last % only, so O(len(s) * len(p)) at worst (a recursive matcher is exponential in the number
// of %).
bool
LikeMatch(const std::string &s, const std::string &p, char esc) {
	// The pattern as tokens: -1 for %, -2 for _, else a literal byte.
	std::vector<int> pat;
	pat.reserve(p.size());
	for (size_t k = 0; k < p.size(); ++k) {
		char c = p[k];
		if (esc && c == esc && k + 1 < p.size())
			pat.push_back(static_cast<unsigned char>(p[++k]));
		else if (c == '%')
			pat.push_back(-1);
		else if (c == '_')
			pat.push_back(-2);
		else
			pat.push_back(static_cast<unsigned char>(c));
	}
	size_t si = 0, pi = 0;
	size_t star = std::string::npos, star_si = 0;
	while (si < s.size()) {
		if (pi < pat.size() && pat[pi] == -1) {
			star = pi++;
			star_si = si;
		} else if (pi < pat.size() && (pat[pi] == -2 || pat[pi] == static_cast<unsigned char>(s[si]))) {
			++si;
			++pi;
		} else if (star != std::string::npos) {
			pi = star + 1;
			si = ++star_si;
		} else {
			return false;
		}
	}
	while (pi < pat.size() && pat[pi] == -1)
		++pi;
	return pi == pat.size();
}

// Tri-state truth: 1 true, 0 false, -1 unknown.
int Truth(const SqlFilter::Node &n, const FilterInput &m);

FilterValue
Eval(const SqlFilter::Node &n, const FilterInput &m) {
	FilterValue r;
	switch (n.op) {
	case Op::Literal:
		return n.value;
	case Op::Prop: {
		if (n.sys) {
			SystemProp(m, n.s, &r);
			return r;
		}
		const amqp::Value *v = AppProp(m, n.s);
		return v ? FilterValue::FromAmqp(*v) : r;
	}
	case Op::Neg: {
		FilterValue v = Eval(*n.kids[0], m);
		if (v.kind == FilterValue::Kind::Int && v.i == INT64_MIN)
			return r; // overflow: unknown
		if (v.kind == FilterValue::Kind::Int)
			v.i = -v.i;
		else if (v.kind == FilterValue::Kind::Double)
			v.d = -v.d;
		else
			return r;
		return v;
	}
	case Op::Arith: {
		FilterValue a = Eval(*n.kids[0], m), b = Eval(*n.kids[1], m);
		if (n.s == "+" && a.kind == FilterValue::Kind::String && b.kind == FilterValue::Kind::String) {
			r.kind = FilterValue::Kind::String;
			r.s = a.s + b.s;
			return r;
		}
		if (!IsNumeric(a) || !IsNumeric(b))
			return r;
		if (a.kind == FilterValue::Kind::Int && b.kind == FilterValue::Kind::Int) {
			// Integer overflow and division by zero make the result unknown (as an evaluation
			// error does in Service Bus: the rule does not match).
			r.kind = FilterValue::Kind::Int;
			bool overflow = false;
			if (n.s == "+")
				overflow = __builtin_add_overflow(a.i, b.i, &r.i);
			else if (n.s == "-")
				overflow = __builtin_sub_overflow(a.i, b.i, &r.i);
			else if (n.s == "*")
				overflow = __builtin_mul_overflow(a.i, b.i, &r.i);
			else if (b.i == 0)
				return FilterValue();
			else if (b.i == -1) // INT64_MIN / -1 overflows (and traps); x % -1 is 0
				overflow = n.s == "/" ? __builtin_sub_overflow(int64_t(0), a.i, &r.i) : (r.i = 0, false);
			else if (n.s == "/")
				r.i = a.i / b.i;
			else
				r.i = a.i % b.i;
			return overflow ? FilterValue() : r;
		}
		r.kind = FilterValue::Kind::Double;
		double x = AsDouble(a), y = AsDouble(b);
		if ((n.s == "/" || n.s == "%") && y == 0)
			return FilterValue();
		if (n.s == "+")
			r.d = x + y;
		else if (n.s == "-")
			r.d = x - y;
		else if (n.s == "*")
			r.d = x * y;
		else if (n.s == "/")
			r.d = x / y;
		else
			r.d = std::fmod(x, y);
		return r;
	}
	default: {
		int t = Truth(n, m);
		if (t >= 0) {
			r.kind = FilterValue::Kind::Bool;
			r.b = t == 1;
		}
		return r;
	}
	}
}

int
Truth(const SqlFilter::Node &n, const FilterInput &m) {
	switch (n.op) {
	case Op::Exists: {
		if (n.sys) {
			FilterValue v;
			return SystemProp(m, n.s, &v) && v.kind != FilterValue::Kind::Null ? 1 : 0;
		}
		return AppProp(m, n.s) ? 1 : 0;
	}
	case Op::Not: {
		int t = Truth(*n.kids[0], m);
		return t < 0 ? -1 : 1 - t;
	}
	case Op::And: {
		int a = Truth(*n.kids[0], m), b = Truth(*n.kids[1], m);
		if (a == 0 || b == 0)
			return 0;
		return (a < 0 || b < 0) ? -1 : 1;
	}
	case Op::Or: {
		int a = Truth(*n.kids[0], m), b = Truth(*n.kids[1], m);
		if (a == 1 || b == 1)
			return 1;
		return (a < 0 || b < 0) ? -1 : 0;
	}
	case Op::Cmp: {
		int c = Compare(Eval(*n.kids[0], m), Eval(*n.kids[1], m));
		if (c == -2)
			return -1;
		const std::string &op = n.s;
		bool r = op == "="    ? c == 0
		         : op == "<>" ? c != 0
		         : op == "<"  ? c < 0
		         : op == ">"  ? c > 0
		         : op == "<=" ? c <= 0
		                      : c >= 0;
		return r ? 1 : 0;
	}
	case Op::In: {
		FilterValue v = Eval(*n.kids[0], m);
		if (v.kind == FilterValue::Kind::Null)
			return -1;
		bool found = false;
		for (size_t k = 1; k < n.kids.size(); ++k)
			if (Equal(v, Eval(*n.kids[k], m)))
				found = true;
		return (found != n.negate) ? 1 : 0;
	}
	case Op::Like: {
		FilterValue v = Eval(*n.kids[0], m);
		if (v.kind != FilterValue::Kind::String)
			return -1;
		bool match = LikeMatch(v.s, n.value.s, n.esc);
		return (match != n.negate) ? 1 : 0;
	}
	case Op::IsNull: {
		bool is_null = Eval(*n.kids[0], m).kind == FilterValue::Kind::Null;
		return (is_null != n.negate) ? 1 : 0;
	}
	default: {
		FilterValue v = Eval(n, m);
		if (v.kind == FilterValue::Kind::Bool)
			return v.b ? 1 : 0;
		return -1;
	}
	}
}

} // namespace

std::unique_ptr<SqlFilter>
SqlFilter::Parse(const std::string &text, std::string *err) {
	err->clear();
	Parser p(text);
	NodeP root = p.ParseAll(err);
	if (!root) {
		if (err->empty())
			*err = "invalid SQL filter";
		return nullptr;
	}
	std::unique_ptr<SqlFilter> f(new SqlFilter);
	f->root_ = std::move(root);
	return f;
}

bool
SqlFilter::Match(const FilterInput &m) const {
	return Truth(*root_, m) == 1;
}

bool
Rule::Match(const FilterInput &m) const {
	switch (kind) {
	case Kind::True:
		return true;
	case Kind::False:
		return false;
	case Kind::Correlation:
		return correlation.Match(m);
	case Kind::Sql:
		return sql && sql->Match(m);
	}
	return false;
}

} // namespace sbemu
