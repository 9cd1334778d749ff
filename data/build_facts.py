"""Build data/counterfact_mini.json: hand-written facts the embedded model knows, CounterFact format.

    .venv/bin/python data/build_facts.py            # writes data/counterfact_mini.json
    .venv/bin/python data/check_facts.py            # re-checks the written file

Every candidate below was written by the kvlens authors (released with the file under CC0-1.0).
For each relation: a main prompt template, paraphrase templates, generation templates and a list
of ``(subject, true object)`` pairs. The counterfactual ``target_new`` of a fact is another object
of the same relation (chosen with a fixed seed). Candidates are scored on the embedded model with
:func:`check_facts.check_records` (teacher-forced, the model's own tokenization and prefix); only
facts that pass are kept. Neighbourhood prompts of a kept fact are the relation's templates filled
with *other kept* subjects whose true object is the same; attribute prompts use kept subjects whose
true object is the counterfactual. A fact with fewer than ``MIN_NEIGHBOURS`` distinct neighbour
subjects is dropped. The output is deterministic for a given model.
"""

from __future__ import annotations

import json
import random
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "counterfact_mini.json"
MIN_NEIGHBOURS = 3  # distinct subjects; prompts are filled from their templates up to N_NEIGHBOUR_PROMPTS
N_NEIGHBOUR_PROMPTS = 6
N_ATTRIBUTE_PROMPTS = 5

# relation_id: (name, main template, paraphrase templates, generation templates, {object: [subjects]})
RELATIONS: dict[str, tuple[str, str, list[str], list[str], dict[str, list[str]]]] = {
    "P30": ("continent", "{} is located in the continent of",
            ["{} is a country in the continent of", "{} is a country that lies in the continent of",
             "{} is part of the continent of"],
            ["{} is a country where", "The people of {} are known for", "{} has a long history of"],
            {" Europe": ["France", "Germany", "Italy", "Spain", "Portugal", "Poland", "Sweden", "Norway",
                         "Finland", "Denmark", "Greece", "Austria", "Switzerland", "Belgium", "Ireland",
                         "Hungary", "Romania", "Ukraine", "Croatia", "Serbia", "Bulgaria"],
             " Africa": ["Kenya", "Nigeria", "Ethiopia", "Ghana", "Egypt", "Morocco", "Algeria", "Tanzania",
                         "Uganda", "Senegal", "Zimbabwe", "Zambia", "Cameroon", "Mali", "Sudan", "Angola",
                         "Mozambique", "Somalia", "Rwanda", "Botswana", "Namibia"],
             " Asia": ["Japan", "China", "India", "Thailand", "Vietnam", "Indonesia", "Malaysia", "Pakistan",
                       "Bangladesh", "Nepal", "Mongolia", "South Korea", "Cambodia", "Laos", "Myanmar",
                       "Sri Lanka", "Afghanistan", "Kazakhstan"],
             " South America": ["Brazil", "Argentina", "Chile", "Peru", "Colombia", "Venezuela", "Ecuador",
                                "Bolivia", "Paraguay", "Uruguay"],
             " North America": ["Canada", "Mexico", "Guatemala", "Honduras", "Cuba", "Panama", "Costa Rica"]}),
    "P17": ("country of city", "{} is a city in the country of",
            ["{} is located in the country of", "{} is a city that lies in the country of",
             "{} is one of the largest cities of"],
            ["{} is a city where", "The streets of {} are", "People who live in {} enjoy"],
            {" France": ["Paris", "Lyon", "Marseille", "Toulouse", "Nice", "Bordeaux", "Lille", "Strasbourg",
                         "Nantes"],
             " Germany": ["Berlin", "Munich", "Hamburg", "Frankfurt", "Cologne", "Stuttgart", "Dresden",
                          "Leipzig", "Düsseldorf"],
             " Italy": ["Rome", "Milan", "Naples", "Venice", "Florence", "Turin", "Bologna", "Palermo", "Genoa"],
             " Spain": ["Madrid", "Barcelona", "Seville", "Valencia", "Bilbao", "Granada", "Malaga", "Zaragoza"],
             " Japan": ["Tokyo", "Osaka", "Kyoto", "Hiroshima", "Nagoya", "Yokohama", "Sapporo", "Kobe"],
             " China": ["Beijing", "Shanghai", "Shenzhen", "Guangzhou", "Wuhan", "Chengdu", "Nanjing", "Tianjin"],
             " India": ["Mumbai", "Delhi", "Bangalore", "Kolkata", "Chennai", "Hyderabad", "Jaipur", "Pune"],
             " Russia": ["Moscow", "Saint Petersburg", "Novosibirsk", "Kazan", "Vladivostok", "Yekaterinburg"],
             " Brazil": ["Rio de Janeiro", "São Paulo", "Brasília", "Salvador", "Recife", "Fortaleza"],
             " Canada": ["Toronto", "Vancouver", "Montreal", "Ottawa", "Calgary", "Edmonton"],
             " Australia": ["Sydney", "Melbourne", "Brisbane", "Perth", "Adelaide", "Canberra"]}),
    "P131": ("city of landmark", "{} is located in the city of",
             ["{} can be found in the city of", "{} is a famous landmark in the city of",
              "{} is a popular tourist attraction in the city of"],
             ["{} was built", "Visitors to {} can", "{} is famous for"],
             {" Paris": ["The Eiffel Tower", "The Louvre", "Notre-Dame Cathedral", "The Arc de Triomphe",
                         "The Champs-Élysées", "The Sacré-Cœur", "The Musée d'Orsay", "The Pompidou Centre",
                         "The Palais Garnier"],
              " Rome": ["The Colosseum", "The Pantheon", "The Trevi Fountain", "The Spanish Steps",
                        "The Roman Forum", "The Circus Maximus", "The Baths of Caracalla"],
              " London": ["Big Ben", "Tower Bridge", "Buckingham Palace", "Westminster Abbey", "The London Eye",
                          "The British Museum", "Trafalgar Square", "The Tower of London", "St Paul's Cathedral"],
              " New York": ["The Statue of Liberty", "The Empire State Building", "Central Park", "Times Square",
                            "The Brooklyn Bridge", "Wall Street", "The Chrysler Building", "Rockefeller Center"],
              " Moscow": ["The Kremlin", "Red Square", "St. Basil's Cathedral", "The Bolshoi Theatre"],
              " Berlin": ["The Brandenburg Gate", "The Reichstag", "Checkpoint Charlie", "Museum Island"],
              " Barcelona": ["The Sagrada Familia", "Park Güell", "Camp Nou", "La Rambla", "Casa Batlló"],
              " San Francisco": ["The Golden Gate Bridge", "Alcatraz Island", "Fisherman's Wharf",
                                 "Lombard Street"],
              " Athens": ["The Acropolis", "The Parthenon", "The Temple of Olympian Zeus"],
              " Istanbul": ["The Hagia Sophia", "The Blue Mosque", "The Grand Bazaar", "Topkapi Palace"],
              " Washington": ["The White House", "The Lincoln Memorial", "The Washington Monument",
                              "The Capitol Building"],
              " Beijing": ["The Forbidden City", "Tiananmen Square", "The Temple of Heaven"]}),
    "P37": ("official language", "The official language of {} is",
            ["In {}, the official language is", "The language spoken by most people in {} is",
             "The main language of {} is"],
            ["People in {} often", "The culture of {} is", "Travellers to {} should know that"],
            {" French": ["France", "Senegal", "Ivory Coast", "Mali", "Niger", "Haiti", "Monaco", "Madagascar",
                         "Chad", "Guinea", "Togo", "Benin", "Burkina Faso"],
             " Spanish": ["Spain", "Mexico", "Argentina", "Colombia", "Peru", "Chile", "Venezuela", "Cuba",
                          "Ecuador", "Bolivia", "Uruguay", "Paraguay", "Guatemala", "Honduras"],
             " Portuguese": ["Brazil", "Portugal", "Angola", "Mozambique", "Cape Verde", "Guinea-Bissau"],
             " German": ["Germany", "Austria", "Liechtenstein"],
             " Arabic": ["Egypt", "Saudi Arabia", "Iraq", "Syria", "Jordan", "Morocco", "Algeria", "Libya",
                         "Tunisia", "Yemen", "Oman", "Kuwait", "Qatar", "Lebanon", "Sudan"],
             " Russian": ["Russia", "Belarus"],
             " Italian": ["Italy", "San Marino"],
             " Dutch": ["the Netherlands", "Suriname"],
             " English": ["the United Kingdom", "Australia", "New Zealand", "Jamaica"]}),
    "P38": ("currency", "The official currency of {} is the",
            ["In {}, people pay with the", "The money used in {} is the", "The national currency of {} is the"],
            ["The economy of {} is", "Prices in {} are", "The central bank of {}"],
            {" euro": ["France", "Germany", "Italy", "Spain", "Portugal", "Greece", "the Netherlands", "Belgium",
                       "Austria", "Ireland", "Finland", "Slovakia", "Slovenia", "Estonia", "Latvia", "Lithuania",
                       "Croatia", "Luxembourg", "Malta", "Cyprus"],
             " dollar": ["the United States", "Canada", "Australia", "New Zealand", "Singapore", "Jamaica",
                         "the Bahamas", "Hong Kong"],
             " peso": ["Mexico", "Argentina", "Chile", "Colombia", "the Philippines", "Cuba", "Uruguay",
                       "the Dominican Republic"],
             " rupee": ["India", "Pakistan", "Nepal", "Sri Lanka", "Mauritius"],
             " pound": ["the United Kingdom", "Egypt", "Lebanon", "Syria"],
             " dinar": ["Iraq", "Jordan", "Kuwait", "Serbia", "Algeria", "Tunisia", "Libya", "Bahrain"],
             " yen": ["Japan"], " ruble": ["Russia", "Belarus"]}),
    "P50": ("author", "{} was written by",
            ["{} is a work by", "{} is a famous book written by", "{} is a classic by the writer"],
            ["{} tells the story of", "{} begins with", "Readers of {} often"],
            {" William Shakespeare": ["Hamlet", "Macbeth", "Othello", "King Lear", "Romeo and Juliet",
                                      "The Tempest", "A Midsummer Night's Dream", "Twelfth Night",
                                      "Julius Caesar", "The Merchant of Venice", "Much Ado About Nothing"],
             " Charles Dickens": ["Oliver Twist", "Great Expectations", "A Christmas Carol", "David Copperfield",
                                  "Bleak House", "A Tale of Two Cities", "Little Dorrit", "Nicholas Nickleby",
                                  "The Pickwick Papers", "Hard Times"],
             " Jane Austen": ["Pride and Prejudice", "Emma", "Sense and Sensibility", "Persuasion",
                              "Mansfield Park", "Northanger Abbey"],
             " J. R. R. Tolkien": ["The Hobbit", "The Lord of the Rings", "The Silmarillion",
                                   "The Fellowship of the Ring", "The Two Towers", "The Return of the King"],
             " Leo Tolstoy": ["War and Peace", "Anna Karenina", "The Death of Ivan Ilyich", "Resurrection"],
             " Mark Twain": ["The Adventures of Tom Sawyer", "Adventures of Huckleberry Finn",
                             "The Prince and the Pauper", "A Connecticut Yankee in King Arthur's Court",
                             "Life on the Mississippi"],
             " Agatha Christie": ["Murder on the Orient Express", "Death on the Nile",
                                  "The Murder of Roger Ackroyd", "And Then There Were None", "The ABC Murders"],
             " J. K. Rowling": ["Harry Potter and the Philosopher's Stone", "Harry Potter and the Chamber of Secrets",
                                "Harry Potter and the Prisoner of Azkaban", "Harry Potter and the Goblet of Fire",
                                "Harry Potter and the Deathly Hallows"],
             " George Orwell": ["Nineteen Eighty-Four", "Animal Farm", "Homage to Catalonia",
                                "Down and Out in Paris and London", "Burmese Days"],
             " Fyodor Dostoevsky": ["Crime and Punishment", "The Brothers Karamazov", "The Idiot",
                                    "Notes from Underground"],
             " Ernest Hemingway": ["The Old Man and the Sea", "A Farewell to Arms", "For Whom the Bell Tolls",
                                   "The Sun Also Rises"]}),
    "P495": ("company country", "{} is a company headquartered in",
             ["{} is a company from", "The company {} was founded in", "{} is a brand based in"],
             ["{} sells", "The products of {} are", "{} was founded"],
             {" Japan": ["Toyota", "Honda", "Sony", "Nintendo", "Panasonic", "Nissan", "Mitsubishi", "Canon",
                         "Toshiba", "Yamaha", "Suzuki", "Mazda", "Subaru", "Fujifilm", "Hitachi"],
              " Germany": ["BMW", "Volkswagen", "Mercedes-Benz", "Siemens", "Adidas", "Audi", "Porsche", "Bosch",
                           "SAP", "Bayer", "Lufthansa", "Puma", "BASF"],
              " South Korea": ["Samsung", "Hyundai", "LG", "Kia"],
              " France": ["Renault", "Peugeot", "Michelin", "L'Oréal", "Chanel", "Louis Vuitton", "Danone",
                          "Air France"],
              " Italy": ["Ferrari", "Fiat", "Lamborghini", "Gucci", "Prada", "Maserati", "Pirelli", "Ducati",
                         "Barilla"],
              " Sweden": ["Volvo", "IKEA", "Ericsson", "Spotify", "H&M", "Saab"]}),
    "P641": ("sport", "{} plays the sport of",
             ["{} is a professional", "The sport played by {} is", "{} became famous playing"],
             ["{} is known for", "{} grew up", "Fans of {} remember"],
             {" basketball": ["LeBron James", "Michael Jordan", "Kobe Bryant", "Stephen Curry", "Shaquille O'Neal",
                              "Kevin Durant", "Magic Johnson", "Larry Bird", "Dirk Nowitzki", "Tim Duncan",
                              "Kareem Abdul-Jabbar"],
              " football": ["Lionel Messi", "Cristiano Ronaldo", "Neymar", "Pelé", "Diego Maradona",
                            "Zinedine Zidane", "David Beckham", "Wayne Rooney", "Kylian Mbappé", "Ronaldinho"],
              " tennis": ["Roger Federer", "Rafael Nadal", "Serena Williams", "Novak Djokovic", "Andy Murray",
                          "Venus Williams", "Pete Sampras", "Andre Agassi", "Maria Sharapova", "Steffi Graf"],
              " golf": ["Tiger Woods", "Jack Nicklaus", "Phil Mickelson", "Rory McIlroy", "Arnold Palmer"],
              " baseball": ["Babe Ruth", "Derek Jeter", "Jackie Robinson", "Barry Bonds", "Shohei Ohtani",
                            "Lou Gehrig"],
              " hockey": ["Wayne Gretzky", "Sidney Crosby", "Alexander Ovechkin", "Mario Lemieux"],
              " cricket": ["Sachin Tendulkar", "Virat Kohli", "Don Bradman", "Brian Lara"],
              " boxing": ["Muhammad Ali", "Mike Tyson", "Floyd Mayweather", "Manny Pacquiao"]}),
    "P1303": ("instrument", "{} is known for playing the",
              ["{} is a famous player of the", "The instrument played by {} is the", "{} became famous playing the"],
              ["{} performed", "The music of {} is", "{} recorded"],
              {" guitar": ["Jimi Hendrix", "Eric Clapton", "Jimmy Page", "Carlos Santana", "B.B. King",
                           "Eddie Van Halen", "Slash", "Keith Richards", "Chuck Berry", "Stevie Ray Vaughan"],
               " piano": ["Frédéric Chopin", "Franz Liszt", "Lang Lang", "Glenn Gould", "Vladimir Horowitz",
                          "Arthur Rubinstein", "Sergei Rachmaninoff"],
               " violin": ["Niccolò Paganini", "Itzhak Perlman", "Yehudi Menuhin", "Jascha Heifetz",
                           "Joshua Bell", "Anne-Sophie Mutter"],
               " trumpet": ["Louis Armstrong", "Miles Davis", "Dizzy Gillespie", "Chet Baker", "Wynton Marsalis"],
               " saxophone": ["Charlie Parker", "John Coltrane", "Sonny Rollins", "Kenny G", "Stan Getz"],
               " drums": ["Ringo Starr", "John Bonham", "Keith Moon", "Neil Peart", "Buddy Rich", "Travis Barker"],
               " cello": ["Yo-Yo Ma", "Pablo Casals", "Jacqueline du Pré", "Mstislav Rostropovich"]}),
    "P103": ("native language", "The mother tongue of {} is",
             ["The native language of {} is", "{} grew up speaking", "The first language of {} is"],
             ["{} was born in", "{} is remembered for", "The life of {}"],
             {" French": ["Emmanuel Macron", "Victor Hugo", "Jean-Paul Sartre", "Charles de Gaulle", "Voltaire",
                          "Albert Camus", "Édith Piaf", "Claude Monet", "Gérard Depardieu"],
              " Russian": ["Vladimir Putin", "Leo Tolstoy", "Fyodor Dostoevsky", "Anton Chekhov",
                           "Mikhail Gorbachev", "Boris Yeltsin", "Alexander Pushkin", "Yuri Gagarin"],
              " Spanish": ["Miguel de Cervantes", "Gabriel García Márquez", "Penélope Cruz", "Salvador Dalí",
                           "Pedro Almodóvar", "Jorge Luis Borges"],
              " Italian": ["Silvio Berlusconi", "Dante Alighieri", "Luciano Pavarotti", "Sophia Loren",
                           "Federico Fellini", "Galileo Galilei"],
              " German": ["Angela Merkel", "Johann Wolfgang von Goethe", "Friedrich Nietzsche", "Immanuel Kant",
                          "Karl Marx", "Ludwig van Beethoven"],
              " Japanese": ["Hayao Miyazaki", "Haruki Murakami", "Akira Kurosawa", "Shinzo Abe", "Yoko Ono"]}),
    "P131s": ("US state of city", "{} is a city in the state of",
              ["{} is located in the US state of", "{} is one of the largest cities in the state of",
               "{} is a city that lies in the state of"],
              ["{} is a city where", "The weather in {} is", "People who live in {} enjoy"],
              {" California": ["Los Angeles", "San Francisco", "San Diego", "Sacramento", "Oakland", "San Jose",
                               "Fresno", "Long Beach"],
               " Texas": ["Houston", "Dallas", "Austin", "San Antonio", "Fort Worth", "El Paso"],
               " Florida": ["Miami", "Orlando", "Tampa", "Jacksonville", "Tallahassee", "Fort Lauderdale"],
               " Ohio": ["Cleveland", "Columbus", "Cincinnati", "Toledo", "Dayton", "Akron"],
               " Pennsylvania": ["Philadelphia", "Pittsburgh", "Harrisburg", "Scranton"],
               " Michigan": ["Detroit", "Ann Arbor", "Lansing", "Grand Rapids"],
               " Arizona": ["Phoenix", "Tucson", "Scottsdale", "Flagstaff"],
               " Washington": ["Seattle", "Spokane", "Tacoma"]}),
    "P279": ("animal class", "{} is a type of",
             ["{} is a kind of", "{} is a species of", "Biologically, {} is a"],
             ["{} lives", "{} eats", "{} can be found"],
             {" mammal": ["The dolphin", "The whale", "The elephant", "The bat", "The horse", "The lion",
                          "The tiger", "The kangaroo", "The giraffe", "The cow"],
              " bird": ["The eagle", "The penguin", "The ostrich", "The parrot", "The owl", "The sparrow",
                        "The flamingo", "The pigeon", "The crow", "The swan"],
              " fish": ["The salmon", "The shark", "The tuna", "The trout", "The cod", "The goldfish", "The carp"],
              " reptile": ["The crocodile", "The lizard", "The turtle", "The iguana", "The alligator",
                           "The chameleon", "The gecko"],
              " insect": ["The ant", "The bee", "The butterfly", "The mosquito", "The beetle", "The grasshopper",
                          "The cockroach", "The dragonfly"]}),
    "P86": ("composer", "{} was composed by",
            ["{} is a work by the composer", "{} is a famous piece by", "The music of {} was written by"],
            ["{} was first performed", "Audiences hearing {}", "{} is often"],
            {" Ludwig van Beethoven": ["The Moonlight Sonata", "Für Elise", "The Emperor Concerto",
                                       "The Pathétique Sonata", "Fidelio"],
             " Wolfgang Amadeus Mozart": ["The Magic Flute", "Don Giovanni", "The Marriage of Figaro",
                                          "Eine kleine Nachtmusik"],
             " Pyotr Ilyich Tchaikovsky": ["Swan Lake", "The Nutcracker", "The Sleeping Beauty",
                                           "The 1812 Overture", "Eugene Onegin"],
             " Giuseppe Verdi": ["Aida", "La traviata", "Rigoletto", "Nabucco"],
             " Richard Wagner": ["Tristan und Isolde", "Parsifal", "Lohengrin", "Tannhäuser",
                                 "The Flying Dutchman"],
             " Giacomo Puccini": ["La bohème", "Tosca", "Madama Butterfly", "Turandot"]}),
    "P170": ("painter", "{} was painted by",
             ["{} is a painting by", "{} is a famous work by the painter", "The artist who painted {} is"],
             ["{} shows", "Visitors who see {}", "{} hangs"],
             {" Leonardo da Vinci": ["The Mona Lisa", "The Last Supper", "Lady with an Ermine",
                                     "The Virgin of the Rocks", "Salvator Mundi"],
              " Vincent van Gogh": ["The Starry Night", "Sunflowers", "The Potato Eaters", "Café Terrace at Night",
                                    "Bedroom in Arles", "Irises"],
              " Pablo Picasso": ["Guernica", "Les Demoiselles d'Avignon", "The Old Guitarist", "The Weeping Woman"],
              " Claude Monet": ["Water Lilies", "Impression, Sunrise", "Woman with a Parasol"]}),
    "P101": ("field of work", "{} is famous for work in the field of",
             ["{} made important contributions to", "{} is a scientist known for", "{} is remembered as a pioneer of"],
             ["{} is best known for", "{} studied", "The ideas of {}"],
             {" physics": ["Albert Einstein", "Isaac Newton", "Niels Bohr", "Max Planck", "Richard Feynman",
                           "Stephen Hawking", "Werner Heisenberg", "Erwin Schrödinger", "Enrico Fermi",
                           "Paul Dirac"],
              " chemistry": ["Dmitri Mendeleev", "Linus Pauling", "Antoine Lavoisier", "Robert Boyle",
                             "John Dalton"],
              " mathematics": ["Carl Friedrich Gauss", "Leonhard Euler", "Euclid", "Pythagoras", "Pierre de Fermat",
                               "Bernhard Riemann", "David Hilbert", "Srinivasa Ramanujan", "Kurt Gödel"],
              " biology": ["Charles Darwin", "Gregor Mendel", "Carl Linnaeus", "Alfred Russel Wallace"],
              " philosophy": ["Plato", "Aristotle", "Socrates", "Immanuel Kant", "Friedrich Nietzsche",
                              "René Descartes", "David Hume", "John Locke", "Confucius"]}),
}


def candidates() -> list[dict]:
    """Every candidate fact as a CounterFact record (neighbourhood/attribute prompts filled later)."""
    out = []
    for rid, (_name, template, paraphrases, generations, table) in RELATIONS.items():
        objects = sorted(table)
        for obj in objects:
            for subject in table[obj]:
                rng = random.Random(f"{rid}|{subject}")
                new = rng.choice([o for o in objects if o != obj])
                out.append({
                    "case_id": len(out),
                    "requested_rewrite": {
                        "prompt": template, "subject": subject, "relation_id": rid,
                        "target_new": {"str": new, "id": f"{rid}:{new.strip()}"},
                        "target_true": {"str": obj, "id": f"{rid}:{obj.strip()}"},
                    },
                    "paraphrase_prompts": [t.replace("{}", subject) for t in paraphrases],
                    "neighborhood_prompts": [], "attribute_prompts": [],
                    "generation_prompts": [t.replace("{}", subject) for t in generations],
                })
    return out


def _fill(templates: list[str], subjects: list[str], n: int) -> list[str]:
    """Up to ``n`` prompts: each subject with the first template, then with the next, ..."""
    prompts = [t.replace("{}", s) for t in templates for s in subjects]
    return prompts[:n]


def finish(records: list[dict]) -> list[dict]:
    """Fill neighbourhood and attribute prompts from kept facts; drop facts with too few neighbours."""
    by_object: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in records:
        rw = r["requested_rewrite"]
        by_object[(rw["relation_id"], rw["target_true"]["str"])].append(rw["subject"])
    kept = []
    for r in records:
        rw = r["requested_rewrite"]
        rid = rw["relation_id"]
        _name, template, paraphrases, _gen, _table = RELATIONS[rid]
        rng = random.Random(f"neighbours|{rid}|{rw['subject']}")
        neighbours = [s for s in by_object[(rid, rw["target_true"]["str"])] if s != rw["subject"]]
        if len(neighbours) < MIN_NEIGHBOURS:
            continue
        rng.shuffle(neighbours)
        attributes = list(by_object.get((rid, rw["target_new"]["str"]), []))
        rng.shuffle(attributes)
        templates = [template, *paraphrases]
        kept.append({**r, "case_id": len(kept),
                     "neighborhood_prompts": _fill(templates, neighbours, N_NEIGHBOUR_PROMPTS),
                     "attribute_prompts": _fill(templates, attributes, N_ATTRIBUTE_PROMPTS)})
    return kept


def main() -> int:
    sys.path.insert(0, str(HERE))
    from check_facts import check_records, summarize

    import kvlens

    model = kvlens.load()
    cands = candidates()
    checks = check_records(model, cands)
    passed = [r for r, c in zip(cands, checks) if c.passed]
    records = finish(passed)
    print(summarize(checks))
    print(f"kept {len(records)} facts after requiring >= {MIN_NEIGHBOURS} neighbour subjects "
          f"({len({r['requested_rewrite']['relation_id'] for r in records})} relations)")
    OUT.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
