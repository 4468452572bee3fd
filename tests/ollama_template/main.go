// Renders an Ollama Modelfile's TEMPLATE with Go's text/template, given the values Ollama passes
// a template that uses .Messages (ollama/ollama template/template.go, Template.Execute): System
// (the system messages joined), Messages (consecutive messages of one role merged) and the rest
// empty. Reads {"modelfile": "...", "messages": [{"role", "content"}]} on stdin.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var input struct {
		Modelfile string    `json:"modelfile"`
		Messages  []message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&input); err != nil {
		panic(err)
	}
	_, rest, found := strings.Cut(input.Modelfile, "TEMPLATE \"\"\"")
	if !found {
		panic("no TEMPLATE in the Modelfile")
	}
	text, _, _ := strings.Cut(rest, "\"\"\"")
	tmpl := template.Must(template.New("").Parse(text))
	var system []string
	var collated []*message
	for i := range input.Messages {
		m := &input.Messages[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(collated); n > 0 && collated[n-1].Role == m.Role && m.Role != "tool" {
			collated[n-1].Content += "\n\n" + m.Content
		} else {
			collated = append(collated, m)
		}
	}
	values := map[string]any{
		"System": strings.Join(system, "\n\n"), "Messages": collated, "Tools": nil, "Response": "",
	}
	if err := tmpl.Execute(os.Stdout, values); err != nil {
		panic(err)
	}
}
